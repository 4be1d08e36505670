"""N-model merges (issue 7, item 3): all four zoo seeds merged into one, every model aligned to
the base (seed 1) or to the running average, with and without REPAIR; the merge's loss against
its parents' and against the vanilla four-way average.

    python benchmarks/multi.py [--arch bert|llama|both] [--seeds 4]
Results: benchmarks/results/multi-{arch}.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` as a package

import argparse
import json

from benchmarks.quality import CALIB, RESULTS
from mergekit_permute.barrier import run_multi
from mergekit_permute.evaluate import Evaluation

METHODS = ["vanilla", "default", "default+reference=average", "default+repair",
           "default+reference=average+repair", "default+matching=weights"]


def run(arch: str, seeds: int) -> dict:
    from benchmarks.zoo import zoo
    cfg, paths = zoo(arch, seeds)
    doc = run_multi([str(p) for p in paths], methods=METHODS, settings=CALIB,
                    evaluation=Evaluation("shakespeare-eval", 256, 64),
                    calibration="shakespeare-calib")
    doc.update(arch=arch, zoo=cfg.model_dump(), seeds=seeds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"multi-{arch}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(arch, {m: round(v["merge_loss"], 4) for m, v in doc["methods"].items()}, flush=True)
    return doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--arch", choices=["bert", "llama", "both"], default="both")
    args = ap.parse_args()
    for arch in (["bert", "llama"] if args.arch == "both" else [args.arch]):
        run(arch, args.seeds)
