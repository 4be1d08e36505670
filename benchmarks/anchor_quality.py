"""The anchor's table: loss barriers on GPT-2 6L/256/4 heads Shakespeare pairs
(benchmarks/anchor_zoo.py), side by side with Theus et al. 2025's Tiny Shakespeare row.

The residual rotation needs each model's head untied from its embeddings (the final norm's gain
folds into the head), so both models are first copied by `mergekit-permute untie` (same
function; see mergekit_permute/io/untie.py), and every method runs on the untied pair: untying
changes no barrier of a permutation method (the interpolated head is the interpolated
embeddings either way). The methods, in the paper's order:

    vanilla                                  plain average
    default+residual=all                     activation matching, permutations only (paper's)
    default+matching=weights+residual=all    weight matching, permutations only (paper's)
    default                                  activation matching, residual rotation (ours)
    default+matching=weights                 weight matching, residual rotation (ours)
    default+matching=learned                 learned, the tool's defaults
    TUNED                                    learned, the tuning zoo's 600-step schedule
    TUNED_LONG                               the same at 1200 steps (lowest of those schedules)
    LONG                                     learned, the defaults at 1200 steps (wins on the
                                             tuning zoo's two pairs: tune_learned.py)

(Rows that end in `+learn_samples=512` were measured before learn_samples existed: their loss
learned on the 512 calibration passages only; the same code path today.)

Every setting here was chosen on the Shakespeare Llama tuning zoo (benchmarks/tune_learned.py),
never on these models. Measured by benchmarks/eval_quality.py's run_pair (calibration 512 x 128
tokens of corpus/calib.txt, barriers on 256 x 128 tokens of corpus/eval.txt, 11 lambdas);
resumable per method.

    python benchmarks/anchor_quality.py [--pairs 1-2,3-4] [--methods ...] [--threads 1]
    python benchmarks/anchor_quality.py --corpus sotu      # the GPT-2 evaluation zoo

Writes benchmarks/results/anchor/gpt2-untied-<a>-<b>.json (eval-gpt2/ with --corpus sotu).
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import eval_quality as eq  # noqa: E402

# corpus -> (zoo, results): the anchor itself, or `--corpus sotu`, the same shape trained on State
# of the Union addresses (anchor_zoo.py --corpus sotu): an evaluation zoo, never tuned on
ZOOS = {"shakespeare": (HERE / ".zoo-anchor", HERE / "results" / "anchor"),
        "sotu": (HERE / ".zoo-eval-gpt2", HERE / "results" / "eval-gpt2")}
PAIRS = {"shakespeare": "1-2,3-4", "sotu": "1-2,3-4"}   # disjoint: no model in two pairs
ARCH = "gpt2-untied"
TUNED = ("default+matching=learned+learn_lr=0.003+learn_steps=600+learn_lambdas=0.4-0.6"
         "+learn_init=best")
# the lowest of the tuning zoo's learn_lr=0.003 schedules (tune_learned.py --text train): the
# same schedule, 1200 steps
TUNED_LONG = TUNED.replace("learn_steps=600", "learn_steps=1200")
# the one change from the defaults that wins on both tuning pairs (tune_learned.py --one-change)
LONG = "default+matching=learned+learn_steps=1200"
METHODS = ["vanilla", "default+residual=all", "default+matching=weights+residual=all", "default",
           "default+matching=weights", "default+matching=learned", TUNED, TUNED_LONG, LONG]
# Theus et al. 2025 (arXiv 2506.22712), GPT-2 6L/256/4 heads, Tiny Shakespeare, barrier (nats)
PAPER = {"vanilla": 2.02, "activation matching": 1.43, "weight matching": 0.34,
         "learned permutations + residual rotation": 0.02}


def untied(zoo: Path, seed: int) -> Path:
    """The seed's model with its head untied (made once, beside the trained model)."""
    from mergekit_permute.io.untie import untie  # (the package only when measuring)
    out = zoo / f"{ARCH}-seed{seed}"
    if not (out / "untied.json").is_file():
        untie(str(zoo / f"gpt2-seed{seed}"), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--pairs", help="seed pairs, e.g. 1-2,3-4 (default: the corpus's PAIRS)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus", choices=sorted(ZOOS), default="shakespeare")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    zoo, out_dir = ZOOS[args.corpus]
    for p in (args.pairs or PAIRS[args.corpus]).split(","):
        a, b = (int(x) for x in p.split("-"))
        untied(zoo, a), untied(zoo, b)
        eq.run_pair(ARCH, a, b, methods, args.threads, zoo, out_dir)


if __name__ == "__main__":
    main()
