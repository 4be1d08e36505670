"""Beyond the paper (issue 7): separate/joint Q/K matching, V/O rotations, REPAIR, data-free
weight matching, each against vanilla and the tool's default in the same run, on every seed
pair of the zoo.

    python benchmarks/beyond.py [--arch bert|llama|neox|all] [--seeds 4] [--lambdas 11]
Results: benchmarks/results/beyond-{arch}.json and .png (same schema as quality-*.json).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` as a package

import argparse

from benchmarks.quality import run

COMMON = ["vanilla", "default", "vanilla+repair", "default+repair", "default+matching=weights",
          "default+matching=weights+repair"]
METHODS = {
    "bert": COMMON + ["default+qk=separate", "default+qk=joint"],
    # RoPE: Q/K dims never move, so qk=joint only adds Q/K evidence to the head assignment.
    # Pre-LayerNorm: the orthogonal residual keeps the all-ones vector; 3/4 of each Q/K head's
    # dims are not rotary, so qk=separate/joint can move them.
    # (default = residual=orthogonal here; head_perm+residual=all is the permutation policy).
    "neox": COMMON + ["default+qk=separate", "default+qk=joint", "head_perm+residual=all"],
    "llama": COMMON + ["default+qk=joint", "default+vo=orthogonal", "default+vo=orthogonal+repair",
                       "head_perm+residual=all+matching=weights"],
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--lambdas", type=int, default=11)
    ap.add_argument("--arch", choices=["bert", "llama", "neox", "all"], default="all")
    args = ap.parse_args()
    for arch in (list(METHODS) if args.arch == "all" else [args.arch]):
        run(arch, args.seeds, args.lambdas, methods=METHODS[arch], name="beyond")
