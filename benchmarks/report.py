"""Write BENCHMARKS.md from benchmarks/results/*.json (numbers are never typed by hand)."""

import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Verma & Elbayad 2024, MultiBERTs seeds 1-5 (10 pairs), MLM loss barrier in the paper's
# definition, as summarised in shared/METHOD.md (secondhand; unverified against the paper).
PAPER = {
    "vanilla": 4.31, "monotonic": 4.13, "ignore_heads": 3.97, "head_perm": 3.71,
    "residual identity": 4.95, "residual first": 7.58, "residual last": 7.41, "residual all": 7.34,
}
# The paper's residual numbers permute the residual stream *alone*; our residual rows add it
# to FF + Head-Perm, so they are quoted under the table rather than beside a row.
PAPER_ROW = {"vanilla": "vanilla", "monotonic": "monotonic", "ignore_heads": "ignore_heads",
             "head_perm": "head_perm"}


def fmt(ms, pct=False):
    m, se = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    if pct:
        return f"{100 * m:.0f}% ± {100 * se:.0f}" if not math.isnan(se) else f"{100 * m:.0f}%"
    return f"{m:.4f} ± {se:.4f}" if not math.isnan(se) else f"{m:.4f}"


def quality_section(doc) -> str:
    zoo = doc["zoo"]
    lines = [f"### {doc['arch']} ({zoo['layers']} layers, hidden {zoo['hidden']}, "
             f"{zoo['heads']} heads" + (f" / {zoo['kv_heads']} KV heads" if doc["arch"] == "llama"
                                        else "") + f", FF {zoo['intermediate']}, {zoo['steps']} "
             f"steps; {doc['seeds']} seeds, {doc['pairs']} pairs)", "",
             f"Endpoint {doc['loss']} on held-out text: {fmt(doc['endpoint_loss'])} "
             f"(unigram baseline {doc['unigram_eval_loss']:.4f}). Calibration: "
             f"{doc['calibration']['samples']} passages x {doc['calibration']['max_length']} "
             "tokens of the calibration split; barriers on the evaluation split, "
             f"{len(doc['lambdas'])} points of lambda.", "",
             "| method | barrier (headline) | barrier (paper's definition) | removed vs. vanilla | "
             "paper, MultiBERTs (paper's definition) |", "|---|---|---|---|---|"]
    for m, row in doc["summary"].items():
        paper = PAPER.get(PAPER_ROW.get(m, ""), None)
        lines.append(f"| {m} | {fmt(row['barrier'])} | {fmt(row['barrier_paper'])} | "
                     f"{fmt(row['removed_vs_vanilla'], pct=True)} | "
                     f"{paper if paper is not None else ''} |")
    lines += ["", "Paper, residual permutation alone (no FF/attention alignment): " + ", ".join(
        f"{k.split()[1]} {v}" for k, v in PAPER.items() if k.startswith("residual")) + ".",
        "", f"![{doc['arch']} curves](benchmarks/results/quality-{doc['arch']}.png)", ""]
    return "\n".join(lines)


def findings(docs) -> str:
    """Statements computed from the results, so they stay true when the numbers change."""
    paper_hp = 1 - PAPER["head_perm"] / PAPER["vanilla"]
    lines = ["### Where ours differ from the paper", ""]
    for doc in docs:
        s, arch = doc["summary"], doc["arch"]
        hp = s["head_perm"]["removed_vs_vanilla"][0]
        residual = {m: v["barrier"][0] for m, v in s.items() if "residual=" in m}
        best = min(residual, key=residual.get)
        helps = [m for m, v in residual.items()
                 if v < s["head_perm"]["barrier"][0]]
        default = "head_perm+residual=orthogonal" if "head_perm+residual=orthogonal" in s \
            else "head_perm+residual=all"
        lines.append(
            f"- **{arch}**: FF + Head-Perm alone removes {100 * hp:.0f}% of the vanilla barrier "
            f"(the paper's MultiBERTs: {100 * paper_hp:.0f}%). The paper kept the residual stream "
            f"unpermuted; here {', '.join(f'`{h}`' for h in helps)} lower "
            f"the barrier below FF + Head-Perm, the best being `{best}` "
            f"({residual[best]:.4f}). Our default for this architecture ({default}, i.e. "
            f"`residual=auto`) removes {100 * s[default]['removed_vs_vanilla'][0]:.0f}% ± "
            f"{100 * s[default]['removed_vs_vanilla'][1]:.0f}. Endpoint loss "
            f"{doc['endpoint_loss'][0]:.3f} vs. a unigram model's {doc['unigram_eval_loss']:.3f}"
            + (" - these BERTs are barely past unigram statistics (MLM learns slowly on CPU "
               "budgets), so their barriers are small and noisy." if
               doc["unigram_eval_loss"] - doc["endpoint_loss"][0] < 0.5 else "."))
    lines += ["- A likely reason for the paper's preference for an unpermuted residual: with the "
              "tied MLM decoder, a residual permutation must also permute the MLM head's "
              "transform on both axes (shared/METHOD.md); our spec does, and every function-"
              "preserving alignment keeps both endpoint losses exactly.", ""]
    return "\n".join(lines)


EXPLAIN = {
    "default": "the tool's default (`residual=auto`: a rotation for pre-norm models, `all` for BERT)",
    "head_perm+residual=all": "Head-Perm + the pooled residual permutation",
    "vanilla+repair": "no alignment, REPAIR on every mix",
    "default+repair": "default alignment, REPAIR on every mix",
    "default+matching=weights": "data-free weight matching (default policies)",
    "default+matching=weights+repair": "weight matching, then REPAIR",
    "default+qk=separate": "Q/K dims matched on query/key features",
    "default+qk=joint": "Q/K features also in the head assignment",
    "head_perm+residual=all+matching=weights": "weight matching, residual permutation",
    "default+vo=orthogonal": "V/O rotated per KV group instead of permuted",
    "default+vo=orthogonal+repair": "V/O rotations, then REPAIR",
}


def best_method(doc) -> str:
    """Lowest mean headline barrier among the methods that need no extra choice by the user."""
    rows = {m: v["barrier"][0] for m, v in doc["summary"].items() if m != "vanilla"}
    return min(rows, key=rows.get)


def versus_default(doc, method: str):
    """Paired difference of headline barriers, method minus default, over the seed pairs."""
    diffs = [p["methods"][method]["barrier"] - p["methods"]["default"]["barrier"]
             for p in doc["per_pair"]]
    m = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) \
        if len(diffs) > 1 else float("nan")
    return m, se


def recommendation(doc) -> str:
    """The lowest-barrier method if it beats the default by more than two paired standard
    errors, else the default: a method is recommended only where the numbers say so."""
    best = best_method(doc)
    if best == "default":
        return "default"
    m, se = versus_default(doc, best)
    return best if m + 2 * se < 0 else "default"


def beyond_section(doc) -> str:
    s = doc["summary"]
    zoo = doc["zoo"]
    lines = [f"### {doc['arch']} ({zoo['layers']} layers, hidden {zoo['hidden']}, {zoo['heads']} "
             f"heads, FF {zoo['intermediate']}, {zoo['steps']} steps; {doc['seeds']} seeds, "
             f"{doc['pairs']} pairs)", "",
             f"Endpoint {doc['loss']}: {fmt(doc['endpoint_loss'])} (unigram baseline "
             f"{doc['unigram_eval_loss']:.4f}); splits, calibration and lambdas as above.", "",
             "| method | what | barrier (headline) | removed vs. vanilla | vs. default |",
             "|---|---|---|---|---|"]
    base = s["default"]["barrier"][0]
    for m, row in s.items():
        rel = row["barrier"][0] / base - 1 if base > 0 else float("nan")
        lines.append(f"| {m} | {EXPLAIN.get(m, '')} | {fmt(row['barrier'])} | "
                     f"{fmt(row['removed_vs_vanilla'], pct=True)} | "
                     f"{'' if m == 'default' else f'{100 * rel:+.0f}%'} |")
    best, rec = best_method(doc), recommendation(doc)
    wins = sum(p["methods"][best]["barrier"] <= p["methods"]["default"]["barrier"]
               for p in doc["per_pair"])
    m, se = versus_default(doc, best) if best != "default" else (0.0, 0.0)
    lines += ["", f"Lowest mean barrier: `{best}`, removing "
              f"{100 * s[best]['removed_vs_vanilla'][0]:.0f}% ± "
              f"{100 * s[best]['removed_vs_vanilla'][1]:.0f} of the vanilla barrier (at or below "
              f"the default on {wins} of {doc['pairs']} pairs; paired difference to the default "
              f"{m:+.4f} ± {se:.4f}). Recommendation: `{rec}`"
              + (" - no alternative beats it by more than two paired standard errors." if
                 rec == "default" else "."), "",
              f"![{doc['arch']} beyond](benchmarks/results/beyond-{doc['arch']}.png)", ""]
    return "\n".join(lines)


def multi_section(doc) -> str:
    parents = doc["parents"]
    mean_parent = sum(parents.values()) / len(parents)
    vanilla = doc["methods"]["vanilla"]["merge_loss"]
    lines = [f"### {doc['arch']}: {len(parents)} seeds merged into one", "",
             f"Parents' {doc['loss']}: " + ", ".join(f"{v:.4f}" for v in parents.values())
             + f" (mean {mean_parent:.4f}).", "",
             "| method | merged loss | minus mean parent | share of the vanilla gap closed |",
             "|---|---|---|---|"]
    for m, row in doc["methods"].items():
        closed = 1 - row["minus_mean_parent"] / (vanilla - mean_parent) \
            if vanilla > mean_parent else float("nan")
        lines.append(f"| {m} | {row['merge_loss']:.4f} | {row['minus_mean_parent']:+.4f} | "
                     f"{'' if m == 'vanilla' else f'{100 * closed:.0f}%'} |")
    return "\n".join(lines + [""])


def perf_section(doc) -> str:
    c, e, mem = doc["calibration_overhead"], doc["end_to_end"], doc["peak_memory"]
    lines = [f"Machine: {doc['machine']}, device `{doc['device']}`; medians of {doc['repeats']} "
             "runs; pair: two models of the Llama zoo.", "",
             "| measure | value | target |", "|---|---|---|",
             f"| calibration pass / bare forwards of both models ({c['tokens']} tokens) | "
             f"{c['ratio']:.2f}x ({c['calibration_s']:.2f} s / {c['bare_forward_s']:.2f} s) | "
             f"{c['target']} |",
             f"| MergeKit `permute` / `linear`, end to end | {e['ratio']:.1f}x "
             f"({e['permute_s']:.1f} s / {e['linear_s']:.1f} s; the calibration pass alone is "
             f"{c['calibration_s']:.1f} s, the rest is loading both models and matching) | - |",
             f"| peak memory of `align` on a {mem['model_fp32_bytes'] / 2**20:.0f} MiB (fp32) "
             f"pair, above the import baseline / one model | {mem['ratio_to_one_model']:.2f}x | "
             f"{mem['target']} |", "",
             "Statistics: streaming cross block vs. the reference code's full 2d x 2d covariance "
             "(8192 tokens), and the assignment (scipy linear_sum_assignment) per space:", "",
             "| width | cross block (s) | full covariance (s) | full / cross | assignment (s) |",
             "|---|---|---|---|---|"]
    for r in doc["stats_scaling"]["by_width"]:
        lines.append(f"| {r['width']} | {r['cross_block_s']:.3f} | {r['full_cov_s']:.3f} | "
                     f"{r['full_over_cross']:.1f}x | {r['assignment_s']:.3f} |")
    lines += ["", "Growth with calibration tokens (width 1024): " + ", ".join(
        f"{r['tokens']} tokens {r['cross_block_s']:.3f} s" for r in doc["stats_scaling"]["by_tokens"]),
        "", "Matching time per kind of space on the zoo pair: " + ", ".join(
            f"{k} {v['total_s']:.3f} s ({v['spaces']} spaces)"
            for k, v in doc["matching_per_kind"].items()), ""]
    return "\n".join(lines)


def main():
    results = HERE / "results"
    parts = ["# Benchmarks", "",
             "Regenerate everything on this machine with `python benchmarks/run_all.py` "
             "(trains the seed zoo if needed, then runs `benchmarks/quality.py` and "
             "`benchmarks/perf.py`, then this report). Every number below is read from "
             "`benchmarks/results/*.json`.", "",
             "Headline barrier: max over lambda of L(lambda A + (1-lambda) B') minus the linear "
             "interpolation of the endpoint losses; the paper's definition subtracts the mean "
             "endpoint loss instead. Mean ± standard error over seed pairs.", "",
             "## Quality: the paper's ablations on our seed zoo", ""]
    docs = [json.loads((results / f"quality-{a}.json").read_text()) for a in ("bert", "llama")
            if (results / f"quality-{a}.json").is_file()]
    for doc in docs:
        parts.append(quality_section(doc))
    if docs:
        parts.append(findings(docs))
    parts += ["The paper's column is MultiBERTs (BERT-base, 12 layers, MLM), a different scale "
              "from our CPU zoo: compare the *ordering* and the fraction removed, not the "
              "absolute numbers.", ""]
    beyond = [json.loads((results / f"beyond-{a}.json").read_text())
              for a in ("bert", "llama", "neox") if (results / f"beyond-{a}.json").is_file()]
    if beyond:
        parts += ["## Beyond the paper", "",
                  "`python benchmarks/beyond.py`: Q/K matching (`qk=`), V/O rotations "
                  "(`vo=orthogonal`), REPAIR (`repair`), data-free weight matching "
                  "(`matching=weights`), and on the GPT-NeoX zoo the pre-LayerNorm rotation "
                  "(the default there) against the best permutation policy; each in the same "
                  "run as vanilla and the default. Method names are `mergekit-permute barrier "
                  "--methods` names; the same keys go in a recipe's `parameters:`.", ""]
        parts += [beyond_section(doc) for doc in beyond]
    multi = [json.loads((results / f"multi-{a}.json").read_text()) for a in ("bert", "llama")
             if (results / f"multi-{a}.json").is_file()]
    if multi:
        parts += ["## N-model merges", "",
                  "`python benchmarks/multi.py`: all zoo seeds merged at once (`mergekit-permute "
                  "barrier A B C D`), the first seed as base; `reference=average` aligns each "
                  "model to the running average of those before it. One merge per "
                  "architecture, so no error bars: read differences of a few hundredths as "
                  "noise.", ""]
        parts += [multi_section(doc) for doc in multi]
    for name in ("perf-cpu.json", "perf-cuda.json"):
        path = results / name
        if path.is_file():
            parts += [f"## Performance ({name[5:-5]})", "", perf_section(json.loads(path.read_text()))]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
