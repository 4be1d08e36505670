"""The one settings schema: every option of an alignment, once.

Each field carries its recipe key, CLI flag, help and role (method: what is aligned; run: how
it executes; calibration: how statistics are gathered, part of the cache key). Click options,
MergeKit's ParameterSpecs, recipe validation, `barrier --methods` names and card labels are all
generated from the fields.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Literal, Optional, Tuple, get_args, get_origin

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_permute.spec.base import Fused

DEFAULT_DATA = "shakespeare-calib"
DATA_PARAM = "calibration_data"      # recipe key of the calibration text (CLI: --data)
WEIGHT_PARAM = "weight"              # the one per-model recipe parameter


def option(default: Any, help: str, *, role: str, recipe: Optional[str] = None,
           cli: Optional[str] = None, vanilla: Any = None, scope: str = "align",
           only_if: Optional[tuple] = None, **constraints) -> Any:
    """A settings field with its recipe name, CLI flag and help in one place. `only_if`
    (field, value), or a tuple of them (any one): the option matters only then (it is left
    out of labels otherwise)."""
    return Field(default, description=help, json_schema_extra={
        "role": role, "recipe": recipe, "cli": cli, "vanilla": vanilla, "scope": scope,
        "only_if": _listed(only_if)}, **constraints)


def _listed(only_if: Optional[tuple]) -> Optional[list]:
    if not only_if:
        return None
    return [list(o) for o in only_if] if isinstance(only_if[0], tuple) else list(only_if)


class RecipeError(ValueError):
    """A `permute` recipe that cannot run; the message names the key and the fix."""


class AlignSettings(BaseModel):
    """How to align B to A. Unknown keys are errors (extra="forbid")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # ---- method ----
    matching: Literal["activations", "weights", "learned"] = option(
        "activations", "activations: correlate features on calibration text (the paper); "
        "weights: data-free weight matching (Git Re-Basin); learned: activation matching, then "
        "exact symmetries (residual rotation, V/O and Q/K maps, SwiGLU scales) learned against "
        "the merged model's loss (both models whole in memory).", role="method",
        vanilla="activations")
    ffn: Literal["permute", "identity"] = option(
        "permute", "Feed-forward neurons: permuted per layer, or left in place.",
        role="method", vanilla="identity")
    attention: Literal["head_perm", "monotonic", "identity", "ignore_heads"] = option(
        "head_perm", "Attention matching: head_perm (the paper), monotonic (head i to head i), "
        "identity, ignore_heads (ablation, not function-preserving).", role="method",
        vanilla="identity")
    residual: Literal["auto", "all", "first", "last", "identity", "orthogonal"] = option(
        "auto", "Residual stream: auto (orthogonal for pre-norm models with an untied head, "
        "else all), all/first/last (a permutation from those points), identity, orthogonal.",
        role="method", vanilla="identity")
    qk: Literal["follow_vo", "separate", "joint"] = option(
        "follow_vo", "Q/K dims inside a head: follow V's permutation (paper), matched on "
        "query/key features (separate), also when assigning heads (joint).", role="method",
        vanilla="follow_vo")
    vo: Literal["permute", "orthogonal"] = option(
        "permute", "V/O dims inside a head: permuted (paper) or rotated per KV group "
        "(Procrustes; separate V/O projections only).", role="method", vanilla="permute")
    repair: bool = option(
        False, "REPAIR: rescale every FF neuron of the merge to the parents' interpolated "
        "statistics (folded into the down projection).", role="method", vanilla=False,
        scope="merge")
    reference: Literal["base", "average"] = option(
        "base", "N >= 3 models: align each to the base, or to the running average of the base "
        "and the models before it.", role="method", vanilla="base", scope="merge")
    learn_steps: int = option(600, "matching=learned: Adam steps (at most; a held-out slice of "
                              "the calibration text stops it early).", role="method",
                              vanilla=600, only_if=("matching", "learned"), ge=1, le=1_000_000)
    learn_lr: float = option(1e-2, "matching=learned: Adam learning rate (0 < lr <= 1).",
                             role="method", vanilla=1e-2, only_if=("matching", "learned"), gt=0,
                             le=1.0, allow_inf_nan=False)
    learn_lambdas: str = option("0.5", "matching=learned: interpolation weights of A whose "
                                "merged losses are minimised: a set averaged every step (0.5, "
                                "0.25/0.5/0.75) or a range sampled uniformly every step "
                                "(0.4-0.6).", role="method", vanilla="0.5",
                                only_if=("matching", "learned"))
    learn_samples: int = option(
        2048, "matching=learned: passages its loss is learned on (at least the calibration "
        "passages; read from the calibration data as far as it holds, shuffled with a fixed "
        "seed; a tenth of the calibration passages is held out to stop early). More than the "
        "statistics need: on a few batches the maps fit the text, not the models.",
        role="method", vanilla=2048, only_if=("matching", "learned"), ge=2)
    learn_init: Literal["activations", "best"] = option(
        "activations", "matching=learned: start from activation matching, or from the better "
        "(held-out merged loss) of activation and weight matching.", role="method",
        vanilla="activations", only_if=("matching", "learned"))
    learn_plateau: Literal["backoff", "stop"] = option(
        "backoff", "matching=learned: when the held-out loss has not improved for a third of "
        "the steps: back to the best maps at half the learning rate (twice at most, then stop), "
        "or stop there.", role="method", vanilla="backoff", only_if=("matching", "learned"))
    learn_permutations: bool = option(
        False, "matching=learned: also learn the FF permutations (slower).", role="method",
        vanilla=False, only_if=("matching", "learned"))
    learn_heads: bool = option(
        False, "matching=learned: also learn the head permutations (whole KV groups with their "
        "query heads; within a GQA group the query heads keep activation matching's order).",
        role="method", vanilla=False, only_if=("matching", "learned"))
    learn_estimator: Literal["ste", "sinkhorn"] = option(
        "ste", "learn_permutations / learn_heads: how their gradient is estimated: ste (hard "
        "permutation forward, straight-through gradient) or sinkhorn (a soft doubly-stochastic "
        "matrix while learning, projected to the nearest permutation at the end).",
        role="method", vanilla="ste",
        only_if=(("learn_permutations", True), ("learn_heads", True)))

    # ---- calibration ----
    samples: int = option(256, "Calibration passages.", role="calibration",
                          recipe="calibration_samples", cli="--samples", ge=1)
    max_length: int = option(128, "Tokens per passage (at most the models' positions).",
                             role="calibration", ge=2)
    batch_size: int = option(8, "Passages per forward batch.", role="calibration", ge=1)
    keep_special_tokens: bool = option(
        True, "Keep [CLS]/[SEP]/BOS... in the statistics.", role="calibration",
        cli="--keep-special-tokens/--drop-special-tokens")
    stats_products: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "Precision of the feature cross products summed into the statistics (the "
        "largest matrix products of a run): float32, or bfloat16 (each batch's products "
        "rounded to 8 bits before the float32 sum: far below a correlation's sampling error; "
        "faster where the hardware multiplies bfloat16 natively). auto: bfloat16 for "
        "bfloat16/float16 checkpoints on a CUDA GPU, float32 otherwise (on the CPU, bfloat16 "
        "products measured no faster).", role="calibration")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # YAML `samples: true` must not silently become 1.
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (int, float):
            raise ValueError("expected a number, got a boolean")
        return value

    # ---- derived ----
    @property
    def function_preserving(self) -> bool:
        return self.attention != "ignore_heads"

    @property
    def aligns_nothing(self) -> bool:
        return (self.ffn, self.attention, self.residual) == ("identity",) * 3

    @property
    def needs_qk_features(self) -> bool:
        return (self.qk != "follow_vo" and self.attention not in ("identity", "ignore_heads")
                and self.matching != "weights")

    @property
    def needs_statistics(self) -> bool:
        return self.repair or (self.matching != "weights" and not self.aligns_nothing)

    @field_validator("learn_lambdas", mode="before")
    @classmethod
    def _lambdas_number(cls, value: Any) -> Any:
        # a recipe's `learn_lambdas: 0.5` is a YAML number
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else value

    @field_validator("learn_lambdas")
    @classmethod
    def _lambdas(cls, value: str) -> str:
        fixed, span = lambdas_of(value)
        return f"{span[0]:g}-{span[1]:g}" if span else "/".join(f"{v:g}" for v in fixed)

    def moves(self, space) -> bool:
        """Whether these settings move a space of the spec at all."""
        return not space.frozen and {"ffn": self.ffn, "attention": self.attention,
                                     "residual": self.residual}[space.kind] != "identity"

    def applies(self, name: str) -> bool:
        only_if = _meta(name)["only_if"]   # (field, value), or a list of them (any one)
        if only_if is None:
            return True
        alternatives = only_if if isinstance(only_if[0], (list, tuple)) else [only_if]
        return any(getattr(self, field) == value for field, value in alternatives)

    def label(self) -> str:
        """Every method field that applies, in declaration order: `ffn=permute,...`."""
        return ",".join(f"{name}={_text(getattr(self, name))}" for name in fields("method")
                        if self.applies(name))

    def method_fields(self) -> Dict[str, Any]:
        return self.model_dump(include=set(fields("method")))

    def calibration_key(self) -> Dict[str, Any]:
        return self.model_dump(include=set(fields("calibration")))

    # ---- recipes ----
    @classmethod
    def from_recipe(cls, params: Dict[str, Any]) -> Tuple["AlignSettings", str]:
        """(settings, calibration data) from a recipe's shared `parameters:`."""
        known = recipe_names()
        unknown = sorted(set(params) - set(known) - {DATA_PARAM})
        if unknown:
            raise RecipeError(f"merge_method permute: unknown parameter(s) {unknown}; known: "
                              f"{sorted([*known, DATA_PARAM])} (and per-model '{WEIGHT_PARAM}')")
        for key, value in params.items():
            if isinstance(value, (list, dict)) or hasattr(value, "filter"):
                raise RecipeError(f"merge_method permute: {key} must be a single value, not a "
                                  "gradient or filtered list")
        try:
            settings = cls(**{known[k]: v for k, v in params.items() if k in known})
        except ValidationError as e:
            by_field = {v: k for k, v in known.items()}
            problems = "; ".join(f"{by_field.get(err['loc'][0], err['loc'][0])}: {err['msg']}"
                                 for err in e.errors())
            raise RecipeError(f"merge_method permute: invalid parameter value(s): {problems}"
                              ) from None
        data = params.get(DATA_PARAM, DEFAULT_DATA)
        if not isinstance(data, str) or not data.strip():
            raise RecipeError(f"merge_method permute: {DATA_PARAM} must be a path or dataset id")
        return settings, data

    # ---- barrier method names ----
    @classmethod
    def vanilla_fields(cls) -> Dict[str, Any]:
        return {name: _meta(name)["vanilla"] for name in fields("method")}

    def with_method(self, name: str) -> "AlignSettings":
        """`head_perm+residual=all`, `default+vo=orthogonal+repair`, `vanilla` -> settings
        (calibration fields kept). Parts: a preset, `default`, a bare boolean field, key=value."""
        method = fields("method")   # (a list: the error below names them in a fixed order)
        parts = [p.strip() for p in name.split("+")]
        # the preset (or default) first, whatever its place: the other parts modify it
        bases = [p for p in parts if p == "default" or p in PRESETS]
        if len(bases) > 1:
            raise ValueError(f"method {name!r} names {bases}: one preset or 'default' per "
                             "method, modified by the other parts")
        chosen: Dict[str, Any] = dict(self.vanilla_fields())
        if bases:
            chosen.update(AlignSettings().method_fields() if bases[0] == "default"
                          else PRESETS[bases[0]])
        for part in parts:
            if part in bases:
                continue
            if part in method and type(self).model_fields[part].annotation is bool:
                chosen[part] = True
            elif "=" in part and part.split("=", 1)[0] in method:
                key, value = part.split("=", 1)
                chosen[key] = value
            else:
                raise ValueError(
                    f"unknown method {part!r} in {name!r}; use {sorted(PRESETS)}, 'default', "
                    + ", ".join(f"'{f}'" for f in method if type(self).model_fields[f].annotation is bool)
                    + " or " + "/".join(f"{f}=" for f in method
                                        if type(self).model_fields[f].annotation is not bool)
                    + " joined with '+'")
        try:
            settings = AlignSettings(**chosen)
        except ValidationError as e:
            raise ValueError(f"method {name!r}: " + "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
        return self.model_copy(update=settings.method_fields())


def lambdas_of(text: str) -> Tuple[Tuple[float, ...], Optional[Tuple[float, float]]]:
    """'0.5' or '0.25,0.5,0.75' (or separated by '/' or ';', e.g. inside `--methods`) -> a fixed
    set and None; '0.4-0.6' -> () and the range. Every value strictly between 0 and 1."""
    text = str(text).strip()
    number = r"((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"   # 0.4, .4, 4e-1
    span = re.fullmatch(number + r"\s*-\s*" + number, text)
    items = list(span.groups()) if span else re.split(r"\s*[,;/]\s*|\s+", text)
    try:
        values = [float(x) for x in items]
    except ValueError:
        values = []
    if not values or any(not (math.isfinite(v) and 0.0 < v < 1.0) for v in values) \
            or (span and values[0] >= values[1]):
        raise ValueError(f"learn_lambdas={text!r}: interpolation weights strictly between 0 and "
                         "1, separated by ',' or '/' (e.g. 0.5 or 0.25/0.5/0.75), or a range "
                         "low-high (e.g. 0.4-0.6)")
    return ((), (values[0], values[1])) if span else (tuple(values), None)


# The paper's ablations, on top of "nothing aligned" (barrier --methods).
PRESETS: Dict[str, Dict[str, Any]] = {
    "vanilla": {},
    "ffn_only": {"ffn": "permute"},
    "head_perm": {"ffn": "permute", "attention": "head_perm"},
    "monotonic": {"ffn": "permute", "attention": "monotonic"},
    "ignore_heads": {"ffn": "permute", "attention": "ignore_heads"},
}


class RunSettings(BaseModel):
    """How a command runs (same result up to float rounding): CLI options only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = option("cpu", "cpu, cuda, cuda:1 ... (under torchrun: each rank its own GPU).",
                         role="run")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Forward dtype on a GPU and the dtype written (auto: the checkpoint's; forwards "
        "on the CPU run in float32).", role="run")
    workers: Optional[int] = option(None, "Threads solving assignments (default: every core).",
                                    role="run", ge=1, le=4096)
    allow_unsafe_pickle: bool = option(
        False, "Fully unpickle .bin checkpoints that the weights-only unpickler rejects (runs "
        "their code: trusted sources only).", role="run", cli="--allow-unsafe-pickle/--safe-pickle")
    cache: Literal["use", "refresh", "off"] = option(
        "use", "Calibration statistics cache: use a valid entry (else compute and store one), "
        "refresh it (recompute and store), or off (neither read nor write: nothing on disk, "
        "no resuming).", role="run")


def _meta(name: str, model=AlignSettings) -> Dict[str, Any]:
    return model.model_fields[name].json_schema_extra


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def fields(role: Optional[str] = None, scope: Optional[str] = None) -> List[str]:
    """Field names, in declaration order, with that role (and scope)."""
    return [n for n in AlignSettings.model_fields
            if (role is None or _meta(n)["role"] == role)
            and (scope is None or _meta(n)["scope"] == scope)]


def recipe_names() -> Dict[str, str]:
    """Recipe key -> field name."""
    return {(_meta(n)["recipe"] or n): n for n in AlignSettings.model_fields}


def choices(name: str, model=AlignSettings) -> Optional[Tuple[str, ...]]:
    ann = model.model_fields[name].annotation
    return tuple(get_args(ann)) if get_origin(ann) is Literal else None


def value_type(name: str, model=AlignSettings) -> type:
    ann = model.model_fields[name].annotation
    if get_origin(ann) is Literal:
        return str
    args = [a for a in get_args(ann) if a is not type(None)]   # Optional[int] -> int
    return args[0] if args else ann


# ---- generated front ends ----------------------------------------------------------------------

def click_options(model=AlignSettings, *, exclude_scope: Tuple[str, ...] = ("merge",)):
    """Decorator adding one click option per field (`--max-length`, `--qk`, ...)."""
    def decorate(f):
        for name in reversed(list(model.model_fields)):
            meta, info = _meta(name, model), model.model_fields[name]
            if meta["scope"] in exclude_scope:
                continue
            flag = meta["cli"] or "--" + name.replace("_", "-")
            kind = value_type(name, model)
            if kind is bool and "/" not in flag:
                flag = f"{flag}/--no-{flag[2:]}"
            opts = dict(default=info.default, show_default=info.default is not None,
                        help=info.description)
            if choices(name, model):
                opts["type"] = click.Choice(choices(name, model))
            elif kind is int:
                low = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
                opts["type"] = click.IntRange(min=low) if low is not None else int
            elif kind is not bool:
                opts["type"] = kind
            f = click.option(flag, name, **opts)(f)
        return f
    return decorate


def settings_from_cli(kwargs: Dict[str, Any], model=AlignSettings):
    """Pop one model's fields out of a click command's kwargs."""
    return model(**{n: kwargs.pop(n) for n in list(kwargs) if n in model.model_fields})


# ---- settings against an architecture ---------------------------------------------------------

def residual_policy(settings: AlignSettings, spec) -> str:
    """`auto`: the orthogonal map where it preserves the function (pre-norm models with an
    untied head; it beat `all` on the Llama and GPT-NeoX zoos, BENCHMARKS.md), else the pooled
    permutation `all`."""
    if settings.residual != "auto":
        return settings.residual
    return "all" if spec.orthogonal_residual_error() else "orthogonal"


def _check_learned(spec, settings: AlignSettings) -> None:
    """matching=learned's refusals, before the activation matching it starts from runs."""
    if not settings.function_preserving:
        raise ValueError("matching=learned learns exact symmetries on top of a function-"
                         "preserving alignment; attention=ignore_heads is not one")
    if settings.aligns_nothing:
        raise ValueError("matching=learned starts from an alignment, and ffn, attention and "
                         "residual are all identity: there is none (leave one of them at its "
                         "default, or use vanilla)")
    if settings.learn_permutations and settings.ffn != "permute":
        raise ValueError("learn_permutations learns the FF neurons' order, and ffn=identity "
                         "keeps it: use ffn=permute, or learn_permutations=false")
    if settings.learn_heads and settings.attention != "head_perm":
        raise ValueError(f"learn_heads learns the heads' order, and attention="
                         f"{settings.attention} keeps it: use attention=head_perm, or "
                         "learn_heads=false")
    if spec.architecture.endswith("ForSequenceClassification"):   # (evaluate.objective_for)
        raise ValueError(f"matching=learned needs a language-model loss; {spec.architecture} "
                         "has a task head (align it with matching=activations)")
    if -(-max(settings.samples, settings.learn_samples) // settings.batch_size) < 2:
        raise ValueError("matching=learned needs at least two calibration batches (one held "
                         "out to stop early): raise --samples / --learn-samples or lower "
                         "--batch-size")


def check_settings(spec, settings: AlignSettings) -> None:
    """Refuse settings the architecture cannot honour, before any expensive work."""
    if settings.matching == "weights" and settings.qk != "follow_vo":
        raise ValueError(f"qk={settings.qk} matches query/key activations; weight matching "
                         "(matching=weights) supports qk=follow_vo only")
    if settings.matching == "learned":
        _check_learned(spec, settings)
    if settings.vo == "orthogonal":
        if settings.matching == "weights" or settings.attention in ("identity", "ignore_heads"):
            raise ValueError("vo=orthogonal rotates V/O inside matched heads: it needs "
                             "matching=activations (or learned) and attention=head_perm or "
                             "monotonic")
        fused = [w.name for w in spec.weights for ax in w.axes if isinstance(ax, Fused) and any(
            p is not None and p.view in ("v", "o") for p in ax.parts)]
        if fused:
            raise ValueError(f"vo=orthogonal needs separate V and O projections; "
                             f"{spec.architecture} fuses V into {fused[0]} (use vo=permute)")
    if settings.qk != "follow_vo" and settings.attention in ("identity", "ignore_heads"):
        raise ValueError(f"qk={settings.qk} permutes Q/K dims inside matched heads: it needs "
                         f"attention=head_perm or monotonic (not {settings.attention})")
    if settings.qk == "joint" and settings.attention == "monotonic":
        raise ValueError("qk=joint scores Q/K agreement when assigning heads, and "
                         "attention=monotonic assigns none (heads stay in place): use qk=separate")
    if settings.matching == "weights" and settings.residual in ("first", "last"):
        raise ValueError(f"residual={settings.residual} picks calibration points; weight "
                         "matching supports residual=all, orthogonal, identity or auto")
    if settings.residual == "orthogonal" and spec.orthogonal_residual_error():
        raise ValueError(f"residual=orthogonal: {spec.orthogonal_residual_error()}")
    if settings.attention == "ignore_heads":
        gqa = [s.name for s in spec.spaces if s.heads and s.heads.num_kv_heads != s.heads.num_heads]
        if gqa:
            raise ValueError("attention=ignore_heads needs as many KV heads as query heads; this "
                             f"{spec.architecture} uses grouped-query attention ({gqa[0]})")
