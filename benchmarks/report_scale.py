"""BENCHMARKS.md's resource sections: scale (memory and time against the floor at real
shapes), exact assignment solvers, and MergeKit's own test suite."""

from typing import Optional


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
                        "on a CPU that did so natively at the time (this one: {native}; "
                        "`auto` has since meant bfloat16 on CUDA only)",
    "bfloat16-products": "`bfloat16-products` runs `align --stats-products bfloat16`",
}


RU_MAXRSS = (" _Measured before the probes read VmHWM: their high-water mark was getrusage's "
             "ru_maxrss, which Linux carries across exec from the benchmark's own process, so a "
             "depth whose pair was built in the same run can read that process's memory (up to "
             "a whole float32 model) instead of its own; the sampled anonymous peak, where "
             "recorded, is unaffected._")


def scale_command(doc, name: str) -> str:
    """The command that wrote a scale results file: recorded, or (older files) implied by its
    recorded settings."""
    if doc.get("command"):
        return doc["command"]
    rows = doc["rows"]
    default = f"scale-{doc['device'].split(':')[0]}" + (
        "" if doc.get("shape_name") == "toy" else f"-{doc.get('shape_name')}") + ".json"
    learned = next((r["learned"]["steps"] for r in rows if r.get("learned")), 0)
    cached = any("cached" in r["variants"] for r in rows)
    return " ".join(
        ["python benchmarks/scale.py", f"--device {doc['device']}", f"--shape {doc['shape_name']}",
         "--layers " + " ".join(str(r["layers"]) for r in rows), f"--repeats {doc['repeats']}"]
        + ([] if cached else ["--no-cached"]) + ([] if "solve" in doc else ["--no-solve"])
        + ([] if doc["variants"] == ["default"] else ["--variant " + " ".join(doc["variants"])])
        + ([f"--learned {learned}"] if learned else [])
        + (["--learned-whole-model"] if any(r.get("learned_whole_model") for r in rows) else [])
        + ([] if name == default else [f"--results benchmarks/results/{name}"]))


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


def jv_slowdowns(doc) -> str:
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
