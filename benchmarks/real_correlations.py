"""FF correlation matrices from real-width runs, for the assignment benchmark.

For each width, a one-layer random-init bf16 pair of a model that has it (scale.py's shapes),
calibrated by `mergekit-permute align` on the shipped text (about 2 tokens per feature: the
tool's minimum is 1, so these are as hard as a user's matrices get); the FF space's
correlation matrix [n, n] (float64, rows = A's neurons, columns = B's), exactly as the solver
receives it, is saved as DIR/ffn-N.npy.

    python benchmarks/real_correlations.py --out benchmarks/.corr [--widths 5632 8192 11008 14336]

`--trained A B` instead saves the first FF space of a trained pair (e.g. the anchor zoo's GPT-2
seeds, benchmarks/anchor_zoo.py) as DIR/ffn-trained-N.npy: the only trained models here, narrow.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

WIDTH_SHAPE = {5632: "tinyllama", 8192: "llama3-1b", 11008: "llama7b", 14336: "mistral7b"}


def dump(width: int, out: Path, work: Path, pair=None) -> Path:
    """`pair` (trained A, B): its first FF space, whatever its width."""
    import mergekit_permute.align.solve as solve
    import mergekit_permute.cli
    target = out / f"ffn-{width}.npy"
    a, b = pair or scale.make_pair(work, 1, WIDTH_SHAPE[width])
    real_match = solve.match_plain

    def saving(corr, spend=False):
        nonlocal target
        if pair and not list(out.glob("ffn-trained-*.npy")):
            target = out / f"ffn-trained-{corr.shape[0]}.npy"
            np.save(target, corr.double().cpu().numpy())
        elif corr.shape[0] == width:
            np.save(target, corr.double().cpu().numpy())
        return real_match(corr, spend)

    solve.match_plain = saving
    try:
        samples = 512 if pair else 2 * width // 44   # (~44 tokens each)
        sys.argv = ["mergekit-permute", "align", a, b, "--data", "shakespeare-calib",
                    "--samples", str(samples), "--max-length", "128",
                    "--batch-size", "16",
                    "--cache", "off", "--residual", "identity", "--out", str(work / "out"),
                    "--overwrite"]
        try:
            mergekit_permute.cli.main()
        except SystemExit as e:
            assert not e.code, e.code
    finally:
        solve.match_plain = real_match
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/.corr")
    ap.add_argument("--widths", type=int, nargs="+", default=sorted(WIDTH_SHAPE))
    ap.add_argument("--trained", nargs=2, metavar=("A", "B"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trained:
        for old in out.glob("ffn-trained-*.npy"):
            old.unlink()
        with tempfile.TemporaryDirectory(prefix="mkp-corr-") as work:
            print(dump(0, out, Path(work), tuple(args.trained)), flush=True)
        return
    for width in args.widths:
        with tempfile.TemporaryDirectory(prefix="mkp-corr-") as work:
            print(dump(width, out, Path(work)), flush=True)


if __name__ == "__main__":
    main()
