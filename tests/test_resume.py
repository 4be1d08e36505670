"""Resumable statistics: a calibration interrupted after a checkpoint continues where it
stopped, with the statistics (and so the alignment) of an uninterrupted run, bit for bit."""

import json

import pytest
import torch

from mergekit_permute.calibration.blocks import BlockModel
from mergekit_permute.align.pipeline import align
from mergekit_permute.settings import AlignSettings
from mergekit_permute.calibration.resume import CHECKPOINT_ENV
from tests.conftest import invoke

SETTINGS = AlignSettings(samples=120, max_length=32)


def _interrupted(a, b, monkeypatch, at_layer: int) -> None:
    original = BlockModel.run

    def run(self, layer, hidden, call):
        if layer == at_layer:
            raise KeyboardInterrupt   # what Ctrl-C does halfway through the night
        return original(self, layer, hidden, call)
    monkeypatch.setattr(BlockModel, "run", run)
    with pytest.raises(KeyboardInterrupt):
        align(a, b, "shakespeare-calib", SETTINGS)
    monkeypatch.setattr(BlockModel, "run", original)


def _layers_run(monkeypatch) -> list:
    ran, original = [], BlockModel.run

    def run(self, layer, hidden, call):
        ran.append(layer)
        return original(self, layer, hidden, call)
    monkeypatch.setattr(BlockModel, "run", run)
    return ran


def _entries(cache):
    return sorted(p.name for p in cache.iterdir())


def test_an_interrupted_calibration_continues_from_its_checkpoint(zoo, tmp_path, monkeypatch):
    a, b = zoo("llama")
    monkeypatch.setenv(CHECKPOINT_ENV, "0")   # a checkpoint after every layer
    monkeypatch.setenv("MERGEKIT_PERMUTE_CACHE", str(tmp_path / "reference"))
    whole = align(a, b, "shakespeare-calib", SETTINGS)

    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEKIT_PERMUTE_CACHE", str(cache))
    _interrupted(a, b, monkeypatch, at_layer=1)
    partial, = [p for p in cache.iterdir() if ".partial-" in p.name]
    assert json.loads((partial / "resume" / "progress.json").read_text())["next_layer"] == 1

    ran = _layers_run(monkeypatch)
    resumed = align(a, b, "shakespeare-calib", SETTINGS)
    assert set(ran) == {1}   # layer 0 was not run again
    for space, views in whole.transforms.items():
        for view, t in views.items():
            assert torch.equal(resumed.transforms[space][view], t), (space, view)
    # The finished entry is the uninterrupted run's, file for file, and nothing is left over.
    entry, = _entries(cache)
    reference, = _entries(tmp_path / "reference")
    assert entry == reference
    meta = json.loads((cache / entry / "meta.json").read_text())
    assert meta == json.loads((tmp_path / "reference" / reference / "meta.json").read_text())
    assert not (cache / entry / "resume").exists()


def test_a_damaged_checkpoint_is_a_warning_and_a_fresh_start(zoo, tmp_path, monkeypatch, caplog):
    a, b = zoo("llama")
    monkeypatch.setenv(CHECKPOINT_ENV, "0")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEKIT_PERMUTE_CACHE", str(cache))
    _interrupted(a, b, monkeypatch, at_layer=1)
    partial, = [p for p in cache.iterdir() if ".partial-" in p.name]
    hidden = sorted((partial / "resume").glob("hidden-b-*.safetensors"))[0]
    hidden.write_bytes(hidden.read_bytes()[:-8])   # truncated

    ran = _layers_run(monkeypatch)
    align(a, b, "shakespeare-calib", SETTINGS)
    assert 0 in ran
    assert "cannot be resumed" in caplog.text and "checksum" in caplog.text
    assert len(_entries(cache)) == 1 and ".partial-" not in _entries(cache)[0]


def test_no_checkpoint_before_the_interval_and_nothing_kept(zoo, tmp_path, monkeypatch):
    """With the default interval a short run never checkpoints; interrupted, it leaves
    nothing behind."""
    a, b = zoo("llama")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEKIT_PERMUTE_CACHE", str(cache))
    _interrupted(a, b, monkeypatch, at_layer=1)
    assert not cache.exists() or _entries(cache) == []


def test_a_bad_checkpoint_interval_is_one_clear_line(zoo, tmp_path, monkeypatch):
    a, b = zoo("llama")
    monkeypatch.setenv(CHECKPOINT_ENV, "soon")
    monkeypatch.setenv("MERGEKIT_PERMUTE_CACHE", str(tmp_path / "cache"))
    r = invoke("mergekit-permute", "align", a, b, "--data", "shakespeare-calib", "--samples",
               "120", "--max-length", "32", "--out", tmp_path / "out")
    assert r.returncode != 0
    assert CHECKPOINT_ENV in r.stdout + r.stderr and "seconds" in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()
