"""Model-card text: what the alignment did (and, when measured, the loss barrier)."""

from typing import Dict, Optional


def alignment_markdown(alignment, barrier: Optional[Dict] = None) -> str:
    from mergekit_permute.align import summarize
    s = alignment.settings
    lines = [
        "",
        "## Alignment (mergekit-permute)",
        "",
        "Before averaging, model B was permuted into model A's basis from activation "
        "correlations on calibration text (Verma & Elbayad 2024, "
        "[arXiv:2403.00986](https://arxiv.org/abs/2403.00986)); "
        + ("the permuted B computes exactly B's function." if s.function_preserving else
           "**attention=ignore_heads is not function-preserving** (paper ablation)."),
        "",
        f"- settings: `{s.label()}`"
        + (f", {s.samples} passages x {s.max_length} tokens" if s.matching == "activations"
           else " (data-free weight matching)"),
    ]
    data = alignment.info.get("data")
    if data:
        lines.append(f"- calibration data: `{data['source']}` ({data['tokens']} tokens, "
                     f"fingerprint `{data['fingerprint']}`)")
    measure = "mean matched correlation" if s.matching == "activations" else "weight cosine"
    lines += ["", f"| space | {measure} before | after |", "|---|---|---|"]
    for kind, row in summarize(alignment.report).items():
        lines.append(f"| {kind} | {row['mean_corr_before']:.3f} | {row['mean_corr_after']:.3f} |")
    if barrier:
        lines += ["", barrier_table(barrier)]
    lines += ["", "Full per-space numbers: `alignment.json`; the permutations: "
              "`permutations.safetensors`.", ""]
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


def permute_card_section() -> str:
    from mergekit_permute.method import RUN
    alignments = RUN["alignments"]
    if not alignments:
        return ""
    if len(alignments) == 1:
        return alignment_markdown(next(iter(alignments.values())), RUN.get("barrier"))
    target = ("each to the running average of the base and the models before it"
              if next(iter(alignments.values())).settings.reference == "average" else "to the base")
    parts = [f"\n## Alignment (mergekit-permute): {len(alignments)} models aligned {target}\n"]
    for k, (model, alignment) in enumerate(alignments.items(), start=1):
        parts.append(f"### Model {k}: `{model}` (alignment-{k}.json)")
        parts.append(alignment_markdown(alignment).replace("## Alignment (mergekit-permute)", ""))
    return "\n".join(parts)
