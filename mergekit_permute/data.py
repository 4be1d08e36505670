"""Text sources: a local .txt (one passage per line), a .jsonl with a `text` field, or a
Hugging Face dataset id (online users only). Plus the public-domain text shipped in the package.
"""

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import List, Optional

LOG = logging.getLogger(__name__)
BUILTIN = {"shakespeare-train", "shakespeare-calib", "shakespeare-eval"}


class DataError(ValueError):
    pass


def builtin_path(name: str) -> Path:
    """Shipped text: Shakespeare's plays (public domain; see mergekit_permute/data/README.md)."""
    return Path(str(resources.files("mergekit_permute") / "data" / f"{name.replace('-', '_')}.txt"))


def load_texts(source: str, samples: Optional[int] = None, field: str = "text") -> List[str]:
    """Up to `samples` non-empty passages, in file order (deterministic). Every problem names
    the file (and line)."""
    if source in BUILTIN:
        source = str(builtin_path(source))
    path = Path(source)
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        if path.is_dir():
            raise DataError(f"{source} is a directory; pass a .txt (one passage per line), a "
                            ".jsonl with a 'text' field, or a dataset id")
        if not path.is_file():
            raise DataError(f"calibration/evaluation data {source!r} does not exist; pass a .txt "
                            "(one passage per line), a .jsonl with a 'text' field, or a dataset id")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise DataError(f"{source}: cannot be read ({e.strerror})") from None
        texts = _json_rows(source, lines, field) if path.suffix in (".jsonl", ".json") else lines
    else:
        texts = _load_hub_dataset(source, field, samples)
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{source!r} holds no text")
    return texts[:samples] if samples else texts


def _json_rows(source: str, lines: List[str], field: str) -> List[str]:
    texts = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}:{i + 1}: expected a JSON object with a {field!r} field, "
                            f"got {type(row).__name__}")
        if field not in row:
            raise DataError(f"{source}:{i + 1}: no {field!r} field")
        if not isinstance(row[field], str):
            raise DataError(f"{source}:{i + 1}: {field!r} must be a string, got "
                            f"{type(row[field]).__name__}")
        texts.append(row[field])
    return texts


def _load_hub_dataset(name: str, field: str, samples: Optional[int]) -> List[str]:
    """`owner/name`, `name:config` or `name:config:split` (split defaults to train)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise DataError(f"{name!r} is not a file, and `datasets` is not installed") from None
    dataset, config, split = (name.split(":") + [None, None])[:3]
    split = split or "train"
    split = f"{split}[:{samples}]" if samples else split
    LOG.info("loading dataset %s (%s, %s) through datasets.load_dataset", dataset, config, split)
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:
        raise DataError(f"{name!r} is neither a local file nor a loadable dataset: {e}") from e
    return [str(x) for x in ds[field]]


def fingerprint(texts: List[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
