"""What every quality section of BENCHMARKS.md shares: a zoo's pair files aggregated
(mean ± standard error over seed pairs), the per-zoo table, the recommendation rule
and the interpolation plot."""

import json
import math
from pathlib import Path
from typing import Optional


HERE = Path(__file__).resolve().parent


def fmt(ms, pct=False):
    m, se = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    if pct:
        return f"{100 * m:.0f}% ± {100 * se:.0f}" if not math.isnan(se) else f"{100 * m:.0f}%"
    return f"{m:.4f} ± {se:.4f}" if not math.isnan(se) else f"{m:.4f}"


def best_method(doc) -> str:
    """Lowest mean headline barrier among the methods that need no extra choice by the user."""
    rows = {m: v["barrier"][0] for m, v in doc["summary"].items() if m != "vanilla"}
    low = min(rows.values())
    tied = [m for m, b in rows.items() if b == low]
    # a tie (e.g. two learned rows both at 0): the current default's name, not a superseded one
    preferred = [m for m in ("default", learned_default(doc["summary"])) if m in tied]
    return (preferred or tied)[0]


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
    # each model's own loss once (pairs that share a model would count it twice)
    endpoint = list({s: p["methods"]["vanilla"][k] for p in pairs
                     for s, k in zip(p["seeds"], ("loss_a", "loss_b"))}.values())
    seeds = {s for p in pairs for s in p["seeds"]}   # the zoo's models these pairs measured
    trained = [m for m in zoo["models"] if m["arch"] == (zoo_arch or arch) and m["seed"] in seeds]
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
            # per pair: its file's calibration time, else that of a later run adding to it
            "calibration_seconds": [c for c in (p.get("calibration_seconds") or next(
                (a["calibration_seconds"] for a in p.get("added", [])
                 if a.get("calibration_seconds")), None) for p in pairs) if c],
            "per_pair": [{"seeds": p["seeds"], "methods": {m: p["methods"][m] for m in methods},
                          "added": p.get("added", [])}
                         for p in pairs],
            # methods some pairs did not measure: per pair, not aggregated
            "partial": {m: [(p["seeds"], p["methods"][m]["barrier"],
                             p["methods"][m].get("removed_vs_vanilla"))
                            for p in pairs if m in p["methods"]]
                        for m in dict.fromkeys(m for p in pairs for m in p["methods"])
                        if m not in methods}}


def partial_table(doc) -> list:
    """Methods some pairs did not measure, per pair, beside the learned default of that pair."""
    if not doc.get("partial"):
        return []
    ref = "default+matching=learned"
    by_seeds = {tuple(p["seeds"]): p["methods"] for p in doc["per_pair"]}
    lines = ["Measured on some pairs only (not in the means above; the last column: its barrier "
             f"minus `{ref}`'s on the same pair):", "",
             "| method | pair | barrier | removed vs. vanilla | minus the learned default's |",
             "|---|---|---|---|---|"]
    for m, rows in doc["partial"].items():
        for seeds, barrier, removed in rows:
            pct = "" if removed is None else f"{100 * removed:.0f}%"
            same = by_seeds.get(tuple(seeds), {}).get(ref)
            diff = "" if same is None else f"{barrier - same['barrier']:+.4f}"
            lines.append(f"| `{m}` | {'-'.join(map(str, seeds))} | {barrier:.4f} | {pct} | {diff} |")
    return lines + [""]


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
    "+learn_init=best": "learned, the tuning zoo's schedule at 1200 steps (the lowest of its "
                        "learn_lr=0.003 schedules)",
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
    differ = [f"`{m}` on {p['seeds'][0]}-{p['seeds'][1]}: {a['threads']}"
              for p, t in zip(doc["per_pair"], doc.get("threads", [])) for a in p["added"]
              if a.get("threads") not in (None, t) for m in a["methods"] if m in doc["summary"]]
    if differ:
        lines += ["", "Threads that differ from their pair's (methods added by later runs): "
                  + "; ".join(differ) + "."]
    lines += ["", "Per pair (barrier): " + "; ".join(
        f"seeds {p['seeds'][0]}-{p['seeds'][1]}: " + ", ".join(
            f"{m} {v['barrier']:.4f}" for m, v in p["methods"].items()) for p in doc["per_pair"]),
        ""]
    lines += partial_table(doc)
    learned = [(p["seeds"], m, p["methods"][m]) for p in doc["per_pair"] for m in p["methods"]
               if "learned" in p["methods"][m]]
    if learned:
        lines += ["Learned maps, overfitting check (merged model at lambda 0.5): " + "; ".join(
            f"seeds {s[0]}-{s[1]}, `{m}`: training batches {r['learned']['train_loss_last']:.4f}, "
            f"held-out calibration slice {r['learned']['held_out_loss_start']:.4f} -> "
            f"{r['learned']['held_out_loss_best']:.4f} (best step {r['learned']['best_step']} of "
            f"{r['learned']['steps_run']}), evaluation split {r['midpoint_loss']:.4f}"
            for s, m, r in learned if "train_loss_last" in r["learned"]) + ".", ""]
        if any("passages" not in r["learned"] for _, _, r in learned):
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
