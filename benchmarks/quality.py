"""Quality benchmark: the paper's Tables 1 and 2 on our seed zoo. For every seed pair, the
loss barrier of every method; aggregated as mean +- standard error over pairs.

    python benchmarks/quality.py [--seeds 4] [--lambdas 11]
Results: benchmarks/results/quality-{arch}.json and quality-{arch}.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` as a package

import argparse
import itertools
import json
import math
from pathlib import Path

from mergekit_permute.settings import AlignSettings
from mergekit_permute.barrier import run_barrier
from mergekit_permute.evaluate import Evaluation

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = {
    "bert": ["vanilla", "ffn_only", "monotonic", "ignore_heads", "head_perm",
             "head_perm+residual=first", "head_perm+residual=last", "head_perm+residual=all"],
    # GQA: ignore_heads (a flat permutation across heads) is undefined, refused.
    "llama": ["vanilla", "ffn_only", "monotonic", "head_perm",
              "head_perm+residual=first", "head_perm+residual=last", "head_perm+residual=all",
              # beyond the paper: RMSNorm gains folded, Procrustes rotation of the residual
              "ffn_only+residual=orthogonal", "head_perm+residual=orthogonal"],
}
CALIB = AlignSettings(samples=512, max_length=64, batch_size=16)


def mean_se(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def run(arch: str, seeds: int, lambdas: int, extra_methods=(), methods=None,
        name: str = "quality") -> dict:
    """Every method on every seed pair -> results/{name}-{arch}.json and .png."""
    from benchmarks.zoo import unigram_entropy, zoo
    cfg, paths = zoo(arch, seeds)
    methods = list(methods or METHODS[arch]) + list(extra_methods)
    pairs = []
    for a, b in itertools.combinations(paths, 2):
        r = run_barrier(a, b, methods=methods, settings=CALIB, calibration="shakespeare-calib",
                        evaluation=Evaluation("shakespeare-eval", 256, 64, lambdas=lambdas))
        pairs.append(r)
        print(arch, Path(a).name, Path(b).name,
              {m: round(v["barrier"], 4) for m, v in r["methods"].items()}, flush=True)
    summary = {}
    for m in methods:
        barriers = [p["methods"][m]["barrier"] for p in pairs]
        paper = [p["methods"][m]["barrier_paper"] for p in pairs]
        removed = [p["methods"][m].get("removed_vs_vanilla", float("nan")) for p in pairs]
        summary[m] = {"barrier": mean_se(barriers), "barrier_paper": mean_se(paper),
                      "removed_vs_vanilla": mean_se(removed)}
    endpoint = [p["methods"]["vanilla"][k] for p in pairs for k in ("loss_a", "loss_b")]
    doc = {"arch": arch, "zoo": cfg.model_dump(), "pairs": len(pairs), "seeds": seeds,
           "lambdas": pairs[0]["lambdas"], "loss": pairs[0]["loss"],
           "calibration": CALIB.model_dump(), "unigram_eval_loss": unigram_entropy(cfg),
           "endpoint_loss": mean_se(endpoint), "summary": summary,
           "curves": {m: [sum(p["methods"][m]["losses"][i] for p in pairs) / len(pairs)
                          for i in range(lambdas)] for m in methods},
           "per_pair": [{"a": p["model_a"], "b": p["model_b"],
                         "methods": {m: {k: v[k] for k in ("barrier", "barrier_paper", "loss_a",
                                                            "loss_b", "losses")}
                                     for m, v in p["methods"].items()}} for p in pairs]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}-{arch}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, RESULTS / f"{name}-{arch}.png")
    return doc


def plot(doc, path):
    from benchmarks.report_tables import plot_curves
    plot_curves(doc, path, f"{doc['arch']} seed zoo: interpolation curves",
                baseline=doc["unigram_eval_loss"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--lambdas", type=int, default=11)
    ap.add_argument("--arch", choices=["bert", "llama", "both"], default="both")
    ap.add_argument("--extra", default="", help="extra comma-separated methods")
    args = ap.parse_args()
    extra = [m for m in args.extra.split(",") if m]
    for arch in (["bert", "llama"] if args.arch == "both" else [args.arch]):
        run(arch, args.seeds, args.lambdas, extra)
