"""Running a MergeKit recipe from our CLI: safe YAML, validation before any work, an atomic
output directory whose card carries its final name."""

import difflib
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from pydantic import ValidationError

from mergekit_permute.barrier import run_barrier, write_report
from mergekit_permute.evaluate import Evaluation
from mergekit_permute.io.checkpoints import Checkpoint
from mergekit_permute.io.models import load_config
from mergekit_permute.io.outputs import atomic_dir, check_output, check_space, follow_umask
from mergekit_permute.io.preflight import check_device, checkpoint_bytes
from mergekit_permute.mergekit import install
from mergekit_permute.mergekit.checks import check_recipe_keys, raw_recipe, recipe_inputs
from mergekit_permute.mergekit.run import PermuteRun, model_path, validate_recipe
from mergekit_permute.settings import RecipeError, RunSettings


def load_recipe(path: Path):
    raw = raw_recipe(path)
    check_recipe_keys(raw, path)
    try:
        return MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: not a valid MergeKit recipe: {e}") from None


def check_method(config, path) -> None:
    """An unknown merge_method named in one line, with the closest known one."""
    from mergekit.merge_methods import registered_methods  # (loaded by install())
    names = sorted(m.spec.name for m in registered_methods())
    if config.merge_method not in names:
        close = difflib.get_close_matches(config.merge_method, names, n=1)
        raise RecipeError(f"{path}: unknown merge_method {config.merge_method!r}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}; MergeKit's "
                          f"methods: {', '.join(names)}")


def check_architectures(config, path: Path) -> None:
    """MergeKit merges one architecture at a time; say so before any work."""
    found: Dict[str, str] = {}
    for ref in config.referenced_models():
        archs = getattr(load_config(ref.model.path), "architectures", None) or ["?"]
        found.setdefault(archs[0], ref.model.path)
    if len(found) > 1:
        listing = ", ".join(f"{arch} ({model})" for arch, model in found.items())
        raise ValueError(f"{path}: the recipe mixes architectures: {listing}. A merge needs "
                         "models of one architecture")


def estimated_bytes(config) -> int:
    """The merge's size: the base model's (or the first model's) weights, in the dtype the
    recipe writes (`out_dtype`, else `dtype`, else as stored)."""
    ref = config.base_model or config.referenced_models()[0]
    name = getattr(config, "out_dtype", None) or config.dtype
    try:
        return checkpoint_bytes(Checkpoint(model_path(ref)), getattr(torch, name) if name else None)
    except (ValueError, OSError, AttributeError):
        return 0


def recipe_barrier(path: Path, out: Path, eval_data: str, lambdas: int, device: str,
                   overwrite: bool, allow_unsafe_pickle: bool = False) -> Tuple[Dict, object]:
    """The loss barrier of a two-model `permute` recipe: vanilla against its own alignment;
    returns the barrier and that alignment (the merge reuses it)."""
    config = load_recipe(path)
    if config.merge_method != "permute":
        raise ValueError(f"{path}: --barrier measures a `permute` merge's alignment; this recipe "
                         f"uses {config.merge_method}")
    settings, data, base, others, _ = validate_recipe(config)
    if len(others) != 1:
        raise ValueError(f"{path}: --barrier measures the path between two models; the recipe "
                         f"merges {len(others) + 1}")
    check_output(out, overwrite, [*recipe_inputs(path, config), ("evaluation data", eval_data)])
    vanilla = settings.with_method("vanilla")
    kept: Dict[str, object] = {}
    result = run_barrier(base, others[0], methods={"vanilla": vanilla, "this merge": settings},
                         settings=settings, evaluation=Evaluation(eval_data, lambdas=lambdas),
                         calibration=data, keep=kept,
                         run=RunSettings(device=device, allow_unsafe_pickle=allow_unsafe_pickle))
    return result, kept["this merge"]


def run_recipe(path: Path, out: Path, *, device: str = "cpu", overwrite: bool = False,
               barrier: Optional[Dict] = None, allow_unsafe_pickle: bool = False,
               alignment=None) -> None:
    """`alignment`: of a two-model `permute` recipe, already computed (by its barrier)."""

    install()
    check_device(device)
    config = load_recipe(path)
    check_method(config, path)
    out = check_output(out, overwrite, recipe_inputs(path, config))
    for ref in config.referenced_models():
        p = ref.model.path
        if p.startswith(("/", ".", "~")) and not Path(p).expanduser().exists():
            raise FileNotFoundError(f"{path}: model {p!r} does not exist")
    check_architectures(config, path)
    check_space(out, estimated_bytes(config))
    if config.merge_method == "permute":
        run = PermuteRun(config, device, allow_unsafe_pickle).attach()   # validates the recipe
        run.output_name, run.barrier = out.name, barrier
        if alignment is not None:
            run.alignments = {run.others[0]: alignment}
    source = Path(path).read_text(encoding="utf-8")
    with atomic_dir(out, overwrite) as tmp:
        run_merge(config, str(tmp), options=MergeOptions(device=device, quiet=False),
                  config_source=source)
        if barrier is not None:
            write_report(barrier, tmp)
        for f in tmp.rglob("*"):    # MergeKit writes its shards 0600
            follow_umask(f, 0o777 if f.is_dir() else 0o666)
        card = tmp / "README.md"
        if card.is_file() and config.merge_method != "permute":
            # MergeKit titles its card with the directory it wrote into: ours is temporary.
            text = card.read_text(encoding="utf-8")
            card.write_text(text.replace(f"\n# {tmp.name}\n", f"\n# {out.name}\n", 1),
                            encoding="utf-8")
