"""Text sources: a local .txt (one passage per line), a .jsonl with a `text` field, or a
Hugging Face dataset id (online users only). Plus the public-domain text shipped in the package.
"""

import codecs
import difflib
import hashlib
import json
import logging
import re
import stat
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

LOG = logging.getLogger(__name__)
BUILTIN = {"shakespeare-train", "shakespeare-calib", "shakespeare-eval"}


class DataError(ValueError):
    pass


def builtin_path(name: str) -> Path:
    """Shipped text: Shakespeare's plays (public domain; see mergekit_permute/data/README.md)."""
    return Path(str(resources.files("mergekit_permute") / "data" / f"{name.replace('-', '_')}.txt"))


# Characters a row is cut to before tokenizing, per token of --max-length: far more than
# max_length tokens span in any text (tokens average ~4 characters), so the cut changes no
# token a model sees, and a huge row (a whole corpus on one line) costs nothing.
CHARS_PER_TOKEN = 32
_CHUNK = 1 << 20
# str.splitlines' line boundaries
_BOUNDARIES = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
_NEWLINE = re.compile(r"[^\n]*\n|[^\n]+")   # JSON Lines rows, each with its \n
_HOW = "pass a .txt (one passage per line), a .jsonl with a 'text' field, or a dataset id"


def chars_for(max_length: int) -> int:
    """Characters kept of a row that is tokenized to at most `max_length` tokens."""
    return max(1, int(max_length)) * CHARS_PER_TOKEN


def clip(text: str, limit: Optional[int]) -> str:
    """`text` cut to `limit` characters (trailing whitespace of the cut dropped), as
    `load_texts(max_chars=limit)` cuts its rows."""
    return text if limit is None or len(text) <= limit else text[:limit].rstrip()


def clip_texts(texts: Sequence[str], max_length: int) -> List[str]:
    """Rows cut to what `max_length` tokens can use (see CHARS_PER_TOKEN), for a tokenizer."""
    limit = chars_for(max_length)
    return [clip(t, limit) for t in texts]


def load_texts(source: str, samples: Optional[int] = None, field: str = "text",
               max_chars: Optional[int] = None) -> List[str]:
    """Up to `samples` non-empty passages, in file order (deterministic), stripped; with
    `max_chars`, each cut to that many characters (`clip`; see `chars_for(max_length)`). A file
    is read only as far as `samples` rows need, and a .txt row only as far as `max_chars` needs.
    Every problem names the file (and line)."""
    if source in BUILTIN:
        source = str(builtin_path(source))
    path = Path(source)
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        _check_regular_file(source, path)
        json_rows = path.suffix in (".jsonl", ".json")
        rows = _read_lines(source, path, None if json_rows else max_chars, json_rows)
        texts = _json_rows(source, rows, field) if json_rows else (t for _, t in rows)
        texts = _first(((clip(t.strip(), max_chars) for t in texts)), samples)
    else:
        close = difflib.get_close_matches(source, sorted(BUILTIN), n=1, cutoff=0.8)
        if close:   # (before trying the Hub: offline, that retries for half a minute)
            raise DataError(f"calibration/evaluation data {source!r} does not exist; did you "
                            f"mean {close[0]!r} (shipped)?")
        texts = _first((clip(t.strip(), max_chars) for t in
                        _load_hub_dataset(source, field, samples)), samples)
    if not texts:
        raise DataError(f"{source!r} holds no text")
    return texts


def _first(texts: Iterator[str], samples: Optional[int]) -> List[str]:
    """The first `samples` non-empty texts (all without `samples`), reading no further."""
    out = []
    for t in texts:
        if t:
            out.append(t)
            if samples and len(out) >= samples:
                break
    return out


def _check_regular_file(source: str, path: Path) -> None:
    """A regular file (or a link to one); anything else is named, without opening it (opening
    a FIFO for reading blocks until a writer comes)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise DataError(f"{source}: cannot be read ({e.strerror})") from None
    if mode is None:
        raise DataError(f"calibration/evaluation data {source!r} does not exist; {_HOW}")
    if stat.S_ISDIR(mode):
        raise DataError(f"{source} is a directory; {_HOW}")
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else None)
    if kind is not None:
        raise DataError(f"{source} is {kind}, not a regular file; {_HOW}")
    if not stat.S_ISREG(mode):
        raise DataError(f"{source} is not a regular file; {_HOW}")


def _read_lines(source: str, path: Path, limit: Optional[int], json_rows: bool = False
                ) -> Iterator[Tuple[int, str]]:
    """(line number, line) for every line (str.splitlines' boundaries; JSON Lines: only \\n,
    as JSON strings may hold U+2028 and the like raw), read a chunk at a time as they are
    consumed. With `limit`, a line is stripped and cut (`clip`) as it is read: no more than
    `limit` characters of it are held. A UTF-8 byte order mark is dropped. Decoding errors name
    the byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    boundaries = {"\n"} if json_rows else _BOUNDARIES
    split = (lambda text: _NEWLINE.findall(text)) if json_rows else \
        (lambda text: text.splitlines(keepends=True))
    offset, number, carry = 0, 0, ""
    parts: List[str] = []   # the current line's text so far
    kept = 0                # (with a limit: its characters, leading whitespace dropped)
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(_CHUNK)
                final = not data
                pending = len(decoder.getstate()[0])
                bad = None
                try:
                    text = carry + decoder.decode(data, final=final)
                except UnicodeDecodeError as e:
                    # the lines before the bad byte are read first: it is an error only
                    # where the rows asked for reach it
                    bad = DataError(f"{source}: not UTF-8 text ({e.reason} at byte "
                                    f"{offset - pending + e.start})")
                    text = carry + e.object[:e.start].decode("utf-8")
                    final = True
                if offset == 0 and text.startswith("\ufeff"):   # (Windows editors write one)
                    text = text[1:]
                offset += len(data)
                carry = ""
                if text.endswith("\r") and not final:   # maybe half of a \r\n
                    text, carry = text[:-1], "\r"
                for piece in split(text):
                    ended = piece[-1] in boundaries
                    body = piece[:-1] if ended else piece
                    if body.endswith("\r") and piece.endswith("\r\n"):
                        body = body[:-1]
                    if limit is None:
                        parts.append(body)
                    elif kept < limit:
                        body = (body if kept else body.lstrip())[:limit - kept]
                        parts.append(body)
                        kept += len(body)
                    if ended:
                        number += 1
                        yield number, _joined(parts, limit)
                        parts, kept = [], 0
                if bad is not None:
                    raise bad
                if final:
                    break
    except OSError as e:
        raise DataError(f"{source}: cannot be read ({e.strerror})") from None
    if parts:
        yield number + 1, _joined(parts, limit)


def _joined(parts: List[str], limit: Optional[int]) -> str:
    line = "".join(parts)
    return line if limit is None else line.strip()


_JSON_LINES = (" - each line must hold one whole JSON object (JSON Lines), not a JSON array or "
               "an object spread over lines")


def _json_rows(source: str, lines: Iterable[Tuple[int, str]], field: str) -> Iterator[str]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            layout = _JSON_LINES if line.lstrip()[:1] in ("[", "{") else ""
            raise DataError(f"{source}:{number}: not valid JSON ({e.msg}){layout}") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}:{number}: expected a JSON object with a {field!r} "
                            f"field, got {type(row).__name__}{_JSON_LINES}")
        if field not in row:
            raise DataError(f"{source}:{number}: no {field!r} field")
        if not isinstance(row[field], str):
            raise DataError(f"{source}:{number}: {field!r} must be a string, got "
                            f"{type(row[field]).__name__}")
        try:
            row[field].encode("utf-8")
        except UnicodeEncodeError as e:   # a lone \\ud83d escape: valid JSON, not text
            raise DataError(f"{source}:{number}: {field!r} holds an unpaired surrogate "
                            f"({row[field][e.start]!r} at character {e.start}), not text; "
                            "fix the export (e.g. a cut emoji) or drop the line") from None
        yield row[field]


def _load_hub_dataset(name: str, field: str, samples: Optional[int]) -> Iterator[str]:
    """`owner/name`, `name:config` or `name:config:split` (split defaults to train): its rows'
    `field`, read lazily (the split is memory-mapped), so that empty rows do not cut the
    passages short of `samples`."""
    try:
        import datasets  # (heavy, and only for hub dataset ids)
    except ImportError:  # pragma: no cover
        raise DataError(f"{name!r} is not a file, and `datasets` is not installed") from None
    dataset, config, split = (name.split(":") + [None, None])[:3]
    split = split or "train"
    LOG.info("loading dataset %s (%s, %s) through datasets.load_dataset", dataset, config, split)
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:
        raise DataError(f"{name!r} is neither a local file nor a loadable dataset: {e}") from e
    if field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no {field!r} column (its columns: "
                        f"{', '.join(ds.column_names)}); pick a dataset with a text column, or "
                        "export the text to a .txt file, one passage per line")
    return (str(row[field]) for row in ds)


def fingerprint(texts: List[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
