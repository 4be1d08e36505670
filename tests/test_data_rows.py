"""Data rows: a huge row is cut to what --max-length tokens can use before it is tokenized, a
file is read only as far as --samples rows need, and what is not a regular file (a FIFO, a
socket, a device) is named without being opened."""

import os
import socket
import threading
import time

import pytest
import transformers as T

from mergekit_permute.io.batches import tokenize
from mergekit_permute.io.data import DataError, builtin_path, chars_for, clip, load_texts
from tests.conftest import invoke


@pytest.fixture(scope="module")
def huge_line(tmp_path_factory):
    """20 MB of real text on one line."""
    text = " ".join(builtin_path("shakespeare-calib").read_text(encoding="utf-8").split())
    path = tmp_path_factory.mktemp("huge") / "one-line.txt"
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < 20_000_000:
            f.write(text + " ")
            written += len(text) + 1
        f.write("\n")
    return path, text


def test_a_huge_line_is_cut_before_it_is_tokenized(zoo, huge_line, monkeypatch):
    path, text = huge_line
    tok = T.AutoTokenizer.from_pretrained(zoo("llama")[0])
    seen, real = [], type(tok).__call__

    def recording(self, texts, **kw):
        seen.extend(len(t) for t in texts)
        return real(self, texts, **kw)
    monkeypatch.setattr(type(tok), "__call__", recording)
    texts = load_texts(str(path), 2)
    batches = tokenize(tok, texts, 32, 8)
    assert seen and max(seen) <= chars_for(32)   # (before: the whole 20 MB line tokenized)
    assert len(texts) == 1
    cut = tokenize(tok, [texts[0][:2000]], 32, 8)
    assert batches[0]["input_ids"].tolist() == cut[0]["input_ids"].tolist()
    assert batches[0]["input_ids"].shape == (1, 32)
    # the evaluation batches (barrier, matching=learned) cut the same way
    evals = tokenize(tok, texts, 32, 8, objective="clm")
    assert evals[0]["input_ids"].tolist() == cut[0]["input_ids"].tolist()


def test_a_row_is_read_no_further_than_max_chars(huge_line):
    path, text = huge_line
    start = time.perf_counter()
    rows = load_texts(str(path), 2, max_chars=chars_for(32))
    assert time.perf_counter() - start < 3
    assert rows == [clip(text, chars_for(32))] and len(rows[0]) <= chars_for(32)


def test_rows_are_cut_as_the_tokenizer_would_see_them(tmp_path):
    data = tmp_path / "rows.txt"
    data.write_text("  short row  \n\n" + "word " * 100 + "\r\n" + " " * 50 + "late\n")
    assert load_texts(str(data)) == ["short row", ("word " * 100).strip(), "late"]
    assert load_texts(str(data), max_chars=12) == ["short row", "word word wo", "late"]
    assert [clip(t, 12) for t in load_texts(str(data))] == load_texts(str(data), max_chars=12)
    assert load_texts(str(data), 2) == ["short row", ("word " * 100).strip()]


def test_reading_stops_after_the_rows_asked_for(tmp_path):
    data = tmp_path / "many.txt"
    data.write_bytes(b"first\n\nsecond\nthird\n" + b"Caf\xe9\n")
    assert load_texts(str(data), 3) == ["first", "second", "third"]
    with pytest.raises(DataError, match="not UTF-8 text .* at byte 23"):
        load_texts(str(data))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"text": ""}\n{"text": "two"}\nnot json\n')
    assert load_texts(str(rows), 2) == ["one", "two"]
    with pytest.raises(DataError, match="rows.jsonl:4: not valid JSON"):
        load_texts(str(rows))


def _refused(path) -> str:
    """load_texts(path)'s error, from a thread that must not block."""
    result = {}

    def run():
        try:
            load_texts(str(path))
        except DataError as e:
            result["error"] = str(e)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"load_texts({path}) blocked"
    return result["error"]


@pytest.mark.parametrize("name", ["calib.txt", "calib"])
def test_a_fifo_is_named_not_opened(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    error = _refused(fifo)
    assert "is a named pipe (FIFO), not a regular file; pass a .txt" in error, error
    assert "does not exist" not in error


def test_sockets_and_devices_are_named(tmp_path):
    sock_path = tmp_path / "s.txt"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert "is a socket, not a regular file" in _refused(sock_path)
    assert "is a character device, not a regular file" in _refused("/dev/null")


def test_the_cli_names_a_fifo(zoo, tmp_path):
    a, b = zoo("llama")
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=invoke(
        "mergekit-permute", "align", a, b, "--data", fifo, "--samples", "16", "--max-length",
        "32", "--out", tmp_path / "o")), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "align blocked on the FIFO"
    r = result["r"]
    assert r.returncode == 2 and "named pipe (FIFO)" in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "o").exists()


def test_a_hub_dataset_with_empty_rows_still_gives_the_passages_asked_for(monkeypatch):
    """A dataset split (here a real `datasets.Dataset`, the download replaced) is read lazily
    until `samples` non-empty rows, like a file: WikiText-style blank rows do not cut it short."""
    import datasets
    rows = {"text": ["", " = Title = ", "", "first", "", "", "second", "third", "", "fourth"],
            "id": list(range(10))}
    asked = []

    def load_dataset(name, config, split):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict(rows)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_texts("someone/wiki:raw", samples=4) == ["= Title =", "first", "second", "third"]
    assert asked == [("someone/wiki", "raw", "train")]
    with pytest.raises(DataError, match="has no 'text' column \\(its columns: id, sentence\\)"):
        rows["sentence"] = rows.pop("text")
        load_texts("someone/wiki:raw:validation", samples=4)


def test_batches_are_padded_on_the_right_whatever_the_tokenizer_says(zoo):
    """Llama's and Gemma's tokenizers pad on the left by default: that would shift short
    rows' positions and score their first token from a pad. Every batch pads on the right."""
    tok = T.AutoTokenizer.from_pretrained(zoo("llama")[0])
    tok.padding_side = "left"
    texts = ["To be, or not to be, that is the question.", "Alas.", "Words, words, words."]
    (batch,) = tokenize(tok, texts, 32, 3, objective="clm")
    mask = batch["attention_mask"]
    assert bool((mask[:, 0] == 1).all()) and bool((mask[:, :-1] >= mask[:, 1:]).all())
    assert int((batch["labels"] != -100).sum()) == int(mask.sum())
