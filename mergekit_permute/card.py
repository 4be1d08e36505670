"""Model cards: the card of a `permute` merge (Hub-ready front matter, what the alignment did,
the recipe) and the loss-barrier table."""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from mergekit_permute.core.alignment import summarize
from mergekit_permute.io.checkpoints import hub_revision, resolve
from mergekit_permute.settings import AlignSettings

PLUGIN_URL = "https://github.com/arcee-ai/mergekit"
PAPER = "[Verma & Elbayad 2024](https://arxiv.org/abs/2403.00986)"


def is_hub_id(path: str) -> bool:
    """`owner/name` (or `name`) that is not a local path: what the Hub's base_model means."""
    return not Path(path).expanduser().exists() and not path.startswith(("/", ".", "~")) \
        and hub_revision(path)[0].count("/") <= 1 and bool(path.strip())


def card_license(model: str) -> Optional[str]:
    """The `license:` of a model's own card (README.md front matter), if it states one."""
    try:
        text = (resolve(model) / "README.md").read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text[3:].split("\n---", 1)[0]) or {}
    except yaml.YAMLError:
        return None
    found = meta.get("license") if isinstance(meta, dict) else None
    return str(found) if isinstance(found, (str, int, float)) and str(found).strip() else None


def license_lines(models: List[str]) -> Tuple[Optional[str], List[str]]:
    """(the card's license, sentences saying where it comes from) from the inputs' cards."""
    found = {m: card_license(m) for m in models}
    known = sorted({v for v in found.values() if v})
    if not known:
        return None, ["The merged models' cards state no license: check each model's terms "
                      "before you share this merge."]
    listing = ", ".join(f"`{m}`: {v or 'not stated'}" for m, v in found.items())
    if len(known) == 1 and all(found.values()):
        return known[0], [f"License: {known[0]}, the license of every merged model ({listing})."]
    return "other", [f"The merged models carry different or unstated licenses ({listing}); the "
                     "merge is derived from all of them, so each one's terms apply."]


def what_was_done(settings: AlignSettings, alignments: List, n_models: int) -> List[str]:
    """Sentences saying what the alignment actually did to the non-base models."""
    s = settings
    first = alignments[0] if alignments else None
    policy = (first.info.get("residual_policy") if first else None) or s.residual
    start = _start(first) if first is not None else s.matching
    how = ("data-free weight matching (Git Re-Basin)" if start == "weights" else
           "activation correlations on calibration text")
    if s.matching == "learned":
        how += ", then exact symmetries learned against the merged model's loss"
    if n_models > 2:
        target = ("each to the running average of the base and the models before it"
                  if s.reference == "average" else "each to the base model")
        lines = [f"{n_models - 1} models were aligned {target}, from {how}."]
    else:
        lines = [f"The second model was aligned to the base model from {how}."]
    if s.ffn == "permute":
        lines.append("Feed-forward neurons: permuted per layer.")
    if s.attention in ("head_perm", "monotonic"):
        heads = ("heads (whole KV groups under GQA) assigned by Head-Perm" if s.attention ==
                 "head_perm" else "heads kept in place (monotonic)")
        vo = ("V/O dims rotated per KV group (orthogonal Procrustes)" if s.vo == "orthogonal"
              else "V/O dims permuted inside each head")
        qk = {"follow_vo": "Q/K dims following V's permutation where RoPE allows",
              "separate": "Q/K dims matched on query/key features",
              "joint": "Q/K dims matched on query/key features, also in the head assignment"}[s.qk]
        lines.append(f"Attention: {heads}; {vo}; {qk}.")
    elif s.attention == "ignore_heads":
        lines.append("Attention: one flat permutation across heads (**ignore_heads: not "
                     "function-preserving**, a paper ablation).")
    if policy == "orthogonal":
        lines.append("Residual stream: rotated by an orthogonal map (orthogonal Procrustes on "
                     "the residual features); each model's norm gains were folded into the "
                     "weights that read them and the aligned models written in the base's norm "
                     "gauge.")
    elif policy in ("all", "first", "last"):
        lines.append(f"Residual stream: one permutation from the {policy} residual point(s).")
    else:
        lines.append("Residual stream: left in place.")
    if s.repair:
        lines.append("REPAIR: every feed-forward neuron of the merge was rescaled to the "
                     "parents' interpolated statistics (folded into the down projection).")
    if s.function_preserving:
        lines.append("Each aligned model computes exactly its original function; the merge is "
                     "their weighted average.")
    return lines


def _start(alignment) -> str:
    """What the alignment matched from: weights or activations (a learned one's start)."""
    matching = alignment.settings.matching
    if matching == "learned":
        return (alignment.info.get("learned") or {}).get("start", "activations")
    return matching


def learned_line(learned: Dict) -> str:
    """`matching: learned` in one line: what was learned, how far, and any back-off."""
    line = (f"- learned exact symmetries ({', '.join(learned['maps'])}) on "
            f"{learned['passages']} passages: held-out merged loss "
            f"{learned['held_out_loss_start']:.4f} -> {learned['held_out_loss_best']:.4f}, best "
            f"at step {learned['best_step']} of {learned['steps_run']}")
    backoffs = learned.get("backoffs") or []
    if backoffs:
        line += (", learning rate halved (back to the best maps) at step "
                 + ", ".join(str(step) for step, _ in backoffs))
    return line


def alignment_section(alignment, heading: str = "### Alignment") -> List[str]:
    s = alignment.settings
    lines = [heading, "", f"- settings: `{s.label()}`"]
    data = alignment.info.get("data")
    if data:
        lines.append(f"- calibration data: `{data['source']}` ({data['passages']} passages x "
                     f"{s.max_length} tokens max, {data['tokens']} tokens, fingerprint "
                     f"`{data['fingerprint']}`)")
    elif s.matching == "weights":
        lines.append("- data-free weight matching (no calibration text)")
    for which, record in alignment.info.get("untied", {}).items():
        lines.append(f"- model {which.upper()}: output head untied from the embeddings by "
                     f"`mergekit-permute untie` (from `{record['source']}`; same function, "
                     "`tie_word_embeddings: false`, one vocabulary x hidden tensor more)")
    if alignment.info.get("learned"):
        lines.append(learned_line(alignment.info["learned"]))
    measure = "weight cosine" if _start(alignment) == "weights" else "mean matched correlation"
    if s.matching == "learned":   # (the report is the start's: learned maps have no such score)
        measure += " (the start, before learning)"
    lines += ["", f"| space | {measure} before | after |", "|---|---|---|"]
    for kind, row in summarize(alignment.report).items():
        lines.append(f"| {kind} | {row['mean_corr_before']:.3f} | {row['mean_corr_after']:.3f} |")
    check = alignment.info.get("function_check")
    if check:
        lines += ["", f"Function check: aligned B's logits differ from B's by "
                  f"{check['aligned_vs_b']:.1e} (relative), where storing B's own float32 "
                  f"original in {check['dtype']} differs by {check['rounding_baseline']:.1e} "
                  f"({check['probe']})."]
    return lines + [""]


def merge_card(run, config_yaml: str, name: str) -> str:
    """The whole README.md of a `permute` merge."""
    models = run.models()
    alignments = list(run.alignments.values())
    license, license_text = license_lines(models)
    meta = {"base_model": [hub_revision(m)[0] for m in models if is_hub_id(m)],
            "library_name": "transformers",
            "tags": ["mergekit", "merge", "mergekit-permute"]}
    if license:
        meta["license"] = license
    lines = ["---", yaml.safe_dump(meta, sort_keys=True).strip(), "---", f"# {name}", "",
             f"This is a merge of pre-trained language models trained from different random "
             f"initializations, created using [mergekit]({PLUGIN_URL}) with the "
             f"mergekit-permute plugin (the alignment method of {PAPER}, with extensions).", "",
             "## Merge Details", "### Merge Method", "",
             f"This model was merged using the `permute` merge method with `{run.base}` as the "
             "base: every other model was first aligned into the base's basis, then all were "
             "averaged with their weights.", ""]
    lines += [f"- {sentence}" for sentence in what_was_done(run.settings, alignments,
                                                            len(models))]
    lines += ["", "### Models Merged", ""]
    lines += [f"* `{m}` (weight {run.weights[m]:g})" + (" - base" if m == run.base else "")
              for m in models]
    lines += ["", *license_text, "", "## Alignment (mergekit-permute)", ""]
    if len(alignments) == 1:
        lines += alignment_section(alignments[0], "### Alignment of the second model")
        files = "`alignment.json` and `permutations.safetensors`"
    else:
        for k, (model, alignment) in enumerate(run.alignments.items(), start=1):
            lines += alignment_section(alignment, f"### Model {k}: `{model}` "
                                                  f"(alignment-{k}.json)")
        files = ("`alignment-K.json` and `permutations-K.safetensors` (K = 1, 2, ...: pass "
                 "`permutations-K.safetensors` itself to `apply`)")
    if run.barrier:
        lines += [barrier_table(run.barrier), "", "![loss barrier](barrier.png)", ""]
    lines += [f"Full per-space numbers: {files} beside the weights; "
              "`mergekit-permute apply` replays them on another checkpoint of the same model.",
              "", "### Configuration", "",
              "The following YAML configuration was used to produce this model:", "",
              "```yaml", config_yaml.strip(), "```", ""]
    return "\n".join(lines)


def barrier_table(result: Dict) -> str:
    lines = [f"Loss barrier ({result['loss']}, on `{result['eval_data']}`; headline: "
             "max over lambda of loss minus the linear interpolation of the endpoint losses)", "",
             "| method | barrier | barrier vs. mean endpoint (paper) | midpoint loss | "
             "loss A | loss B |", "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['barrier']:.4f} | {m['barrier_paper']:.4f} | "
                     f"{m['midpoint_loss']:.4f} | {m['loss_a']:.4f} | {m['loss_b']:.4f} |")
    return "\n".join(lines)
