"""Real-size machinery on tiny models: layer-wise calibration (one block in memory, the same
statistics as a whole-model forward), the checkpoint's dtype, parallel solving, sharded
streaming output, torch.distributed, and the refusals before any work."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from mergekit_permute.calibration.blocks import BlockModel, BlockRunError
from mergekit_permute.calibration.calibrate import calibrate, capture, feature_points, token_mask
from mergekit_permute.io.batches import tokenize
from mergekit_permute.io.data import load_texts
from mergekit_permute.align.pipeline import align
from mergekit_permute.settings import AlignSettings
from mergekit_permute.spec import spec_for_config
from mergekit_permute.calibration.stats import CrossStats
from tests.conftest import invoke

SETTINGS = AlignSettings(samples=120, max_length=32)
ARGS = ["--data", "shakespeare-calib", "--samples", "120", "--max-length", "32"]


def _copy(src, dst, dtype=None, shard=None):
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32)
    model.save_pretrained(dst, **({"max_shard_size": shard} if shard else {}))
    T.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def test_calibration_from_disk_holds_one_block_at_a_time(zoo, monkeypatch):
    a, b = zoo("llama")
    seen = []
    original = BlockModel.run

    def run(self, layer, hidden, call):
        live = {name.split(".")[2] for name, p in self.model.named_parameters()
                if name.startswith(self.spec.blocks + ".") and p.device.type != "meta"}
        seen.append(live)
        assert live == {str(layer)}, live   # only the block being run is in memory
        return original(self, layer, hidden, call)
    monkeypatch.setattr(BlockModel, "run", run)
    align(a, b, "shakespeare-calib", SETTINGS, cache="refresh")
    assert len(seen) >= 2 * 2   # two models, two layers


def test_layerwise_statistics_equal_a_whole_model_forward(zoo):
    """The block-by-block pass computes exactly what hooks on one full forward see."""
    a, b = zoo("bert")
    model_a, model_b = (T.AutoModelForMaskedLM.from_pretrained(p).eval() for p in (a, b))
    spec = spec_for_config(model_a.config)
    tok = T.AutoTokenizer.from_pretrained(a)
    batches = tokenize(tok, load_texts("shakespeare-calib", 64), 32, 8, spec.architecture)
    stats = calibrate(model_a, model_b, spec, batches, ["ffn.1", "attn.0", "residual"])
    points = dict(feature_points(spec, ["ffn.1", "attn.0"]))
    whole = {k: CrossStats.zeros(spec.space(k.split("@")[0]).size,
                                 spec.space(k.split("@")[0]).size) for k in points}
    with capture(model_a, list(points.values())) as ca, capture(model_b, list(points.values())) as cb:
        for batch in batches:
            mask = token_mask(batch, (), True).reshape(-1)
            with torch.no_grad():
                model_a(**batch)
                model_b(**batch)
            for key, p in points.items():
                name = f"{p.module}:{p.where}"
                fa, fb = (c[name].reshape(mask.shape[0], -1)[mask] for c in (ca, cb))
                whole[key].update(fa, fb)
    for key in points:
        for name, t in whole[key].tensors().items():
            torch.testing.assert_close(stats[key].tensors()[name], t, rtol=1e-6, atol=1e-6)
    # The residual summary pools every residual point (embeddings + 2 per BERT layer).
    assert stats.residual.points == 1 + 2 * spec.num_layers


@pytest.mark.parametrize("residual,tolerance", [("all", 1e-5), ("orthogonal", 3e-2)])
def test_bfloat16_checkpoints_stay_bfloat16(zoo, tmp_path, residual, tolerance):
    a, b = zoo("llama")
    a16, b16 = _copy(a, tmp_path / "a16", torch.bfloat16), _copy(b, tmp_path / "b16", torch.bfloat16)
    out = tmp_path / "aligned"
    r = invoke("mergekit-permute", "align", a16, b16, *ARGS, "--residual", residual,
               "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # Compared in float32 (bf16 weights upcast exactly): permutations are exact in any dtype;
    # a rotation rounds each weight back to bf16, which bf16 allows.
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        x = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
        y = T.AutoModelForCausalLM.from_pretrained(b16, dtype=torch.float32)(input_ids=ids).logits
    assert float((x - y).norm() / y.norm()) < tolerance


def test_parallel_solving_equals_serial(zoo, monkeypatch):
    """Overlapped (accelerator) solving on two threads: the serial result, bit for bit."""
    import mergekit_permute.align.pipeline as pipeline
    import mergekit_permute.align.solve as solve
    a, b = zoo("llama")
    serial = align(a, b, "shakespeare-calib", SETTINGS, workers=1)
    monkeypatch.setattr(pipeline, "Solver",
                        lambda *args, **kw: solve.Solver(*args, **{**kw, "overlap": True}))
    parallel = align(a, b, "shakespeare-calib", SETTINGS, workers=2)
    for space, views in serial.transforms.items():
        for view, t in views.items():
            assert torch.equal(parallel.transforms[space][view], t), (space, view)
    assert set(parallel.timings["solve_seconds"]) == set(serial.report)


def _solver_threads(monkeypatch) -> set:
    """The names of the threads that solve spaces from now on."""
    import threading

    import mergekit_permute.align.solve as solve
    threads, original = set(), solve.match_space

    def match_space(*args):
        threads.add(threading.current_thread().name)
        return original(*args)
    monkeypatch.setattr(solve, "match_space", match_space)
    return threads


def test_batched_solving_equals_serial(zoo, monkeypatch):
    """On the CPU, a layer's spaces are solved together on `workers` threads while the
    forwards wait; the result is the one-at-a-time one, bit for bit."""
    a, b = zoo("llama")
    serial = align(a, b, "shakespeare-calib", SETTINGS, workers=1)
    threads = _solver_threads(monkeypatch)
    batched = align(a, b, "shakespeare-calib", SETTINGS, workers=3)
    # (a fast space may finish before the next is handed in, so one thread may do them all)
    assert threads and all(t.startswith("mergekit-permute-solve") for t in threads), threads
    for space, views in serial.transforms.items():
        for view, t in views.items():
            assert torch.equal(batched.transforms[space][view], t), (space, view)


def test_overlapped_solving_equals_inline(zoo, monkeypatch):
    """On an accelerator each layer is solved on a background thread while the next one is
    calibrated; the result is the inline (CPU) one, bit for bit."""
    import mergekit_permute.align.pipeline as pipeline
    import mergekit_permute.align.solve as solve
    a, b = zoo("llama")
    inline = align(a, b, "shakespeare-calib", SETTINGS, workers=1)
    threads = _solver_threads(monkeypatch)
    monkeypatch.setattr(pipeline, "Solver",
                        lambda *args, **kw: solve.Solver(*args, **{**kw, "overlap": True}))
    overlapped = align(a, b, "shakespeare-calib", SETTINGS, workers=1)
    assert threads and all(t.startswith("mergekit-permute-solve") for t in threads), threads
    for space, views in inline.transforms.items():
        for view, t in views.items():
            assert torch.equal(overlapped.transforms[space][view], t), (space, view)


def test_float32_partial_sums_match_float64_statistics(monkeypatch):
    """Cross products are summed in float32 between flushes into the float64 totals: over many
    batches and several flushes they equal a float64 computation to float32 precision."""
    import mergekit_permute.calibration.stats as stats
    monkeypatch.setattr(stats, "FLUSH_TOKENS", 100)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 6, generator=gen) * 3 + 5          # a large mean: cancellation-prone
    b = a[:, [2, 0, 1, 5, 4, 3]] + 0.5 * torch.randn(1000, 6, generator=gen)
    s = CrossStats.zeros(6, 6)
    assert torch.equal(s.tensors()["sum_ab"], torch.zeros(6, 6, dtype=torch.float64))
    s = CrossStats.zeros(6, 6)
    for i in range(0, 1000, 64):
        s.update(a[i:i + 64], b[i:i + 64])
    ref = torch.corrcoef(torch.cat([a, b], 1).T.double())[:6, 6:]
    torch.testing.assert_close(s.correlation(), ref, rtol=0, atol=1e-5)
    # (the sums are about shifts; the uncentred moment is recovered from them)
    torch.testing.assert_close(s.raw_sum_ab(), a.double().T @ b.double(), rtol=1e-6, atol=0)
    assert s._pending is None and s.sum_ab.is_contiguous()


@pytest.mark.parametrize("tokens", [300, 1000])   # one flush or several
def test_sealed_statistics_are_read_without_change(monkeypatch, tokens):
    """What the cache writer reads on its own thread (`totals`) is what `tensors()` gives, and
    reading (totals, correlation) changes nothing once sealed."""
    import mergekit_permute.calibration.stats as stats
    monkeypatch.setattr(stats, "FLUSH_TOKENS", 512)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(tokens, 24, generator=gen), torch.randn(tokens, 24, generator=gen)
    s = CrossStats.zeros(24, 24)
    for i in range(0, tokens, 100):
        s.update(a[i:i + 100], b[i:i + 100])
    s.seal()
    state = (s.sum_ab, s._pending)
    totals, corr = s.totals(), s.correlation()
    assert s.sum_ab is state[0] and s._pending is state[1]
    assert all(torch.equal(totals[k], v) for k, v in s.flush().tensors().items())
    assert torch.equal(corr, s.correlation())


def test_sharded_checkpoint_is_written_shard_by_shard(zoo, tmp_path):
    a, b = zoo("llama")
    sharded = _copy(b, tmp_path / "b_sharded", shard="200KB")
    index = json.loads((tmp_path / "b_sharded" / "model.safetensors.index.json").read_text())
    out = tmp_path / "aligned"
    r = invoke("mergekit-permute", "align", a, sharded, *ARGS, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    written = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index["weight_map"].values()))
    assert len(set(written.values())) == len(shards) > 1
    assert {k: shards.index(v) for k, v in index["weight_map"].items()} == \
        {k: sorted(set(written.values())).index(v) for k, v in written.items()}
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        x = T.AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        y = T.AutoModelForCausalLM.from_pretrained(b)(input_ids=ids).logits
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_two_gloo_processes_give_the_permutations_of_one(zoo, tmp_path):
    a, b = zoo("llama")
    one = tmp_path / "one"
    r = invoke("mergekit-permute", "align", a, b, *ARGS, "--residual", "all", "--cache", "off",
               "--permutations-only", "--out", one)
    assert r.returncode == 0, r.stdout + r.stderr
    two = tmp_path / "two"
    torchrun = shutil.which("torchrun", path=str(__import__("pathlib").Path(sys.executable).parent))
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mergekit_permute",
                        "align", a, b, *ARGS, "--residual", "all", "--cache", "off",
                        "--permutations-only", "--out", str(two)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    p1, p2 = load_file(one / "permutations.safetensors"), load_file(two / "permutations.safetensors")
    assert p1.keys() == p2.keys()
    for key in p1:
        assert torch.equal(p1[key], p2[key]), key
    docs = [json.loads((d / "alignment.json").read_text()) for d in (one, two)]
    assert docs[0]["data"]["tokens"] == docs[1]["data"]["tokens"]


def test_too_little_memory_is_refused_before_any_work(zoo, tmp_path, monkeypatch):
    import mergekit_permute.calibration.collect as collect
    a, b = zoo("llama")
    monkeypatch.setattr(collect, "available_memory", lambda device: 1 << 20)
    ran = []
    monkeypatch.setattr(BlockModel, "catch", lambda *a, **k: ran.append(1))
    r = invoke("mergekit-permute", "align", a, b, *ARGS, "--no-cache", "--out", tmp_path / "o")
    assert r.returncode == 2 and "needs about" in r.stderr and "GiB are free" in r.stderr
    assert not ran and not (tmp_path / "o").exists()


def test_a_block_that_cannot_run_alone_is_named(zoo):
    a, b = zoo("llama")
    model_a, model_b = (T.AutoModelForCausalLM.from_pretrained(p).eval() for p in (a, b))
    spec = spec_for_config(model_a.config)

    def broken(*args, **kwargs):
        raise RuntimeError("needs the state of the layer before")
    model_b.model.layers[1].forward = broken
    batches = tokenize(T.AutoTokenizer.from_pretrained(a), load_texts("shakespeare-calib", 64),
                       32, 8, spec.architecture)
    with pytest.raises(BlockRunError, match="block 1 of model.layers could not run standalone"):
        calibrate(model_a, model_b, spec, batches, ["ffn.1"])


def test_16bit_weights_are_transformed_in_float32_and_rounded_once(zoo):
    """A bf16 weight goes through fold, rotation and unfold in float32 and is rounded to bf16
    once: the float64 computation rounded once, up to float32's rounding on exact ties."""
    a, b = zoo("llama")
    alignment = align(a, b, "shakespeare-calib", SETTINGS.model_copy(update={"residual":
                                                                            "orthogonal"}))
    state = T.AutoModelForCausalLM.from_pretrained(b).state_dict()
    moved = 0
    for name, t in state.items():
        low = alignment.tensor(name, t.to(torch.bfloat16))
        assert low.dtype == torch.bfloat16
        reference = alignment.tensor(name, t.to(torch.bfloat16).double()).to(torch.bfloat16)
        same = (low == reference).float().mean()
        assert same > 0.999, (name, float(same))
        moved += not torch.equal(low, t.to(torch.bfloat16))
    assert moved > len(state) // 2   # the rotation reached most weights


def test_finite_check_is_exact_for_every_dtype():
    from mergekit_permute.io.models import _all_finite
    big16 = torch.full((1000, 1000), 65504.0, dtype=torch.float16)
    assert _all_finite(big16)                              # a float64 sum does not overflow
    assert _all_finite(torch.full((10,), 1e308, dtype=torch.float64))   # nor float64's own
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.ones(64, dtype=dtype)
            t[7] = bad
            assert not _all_finite(t), (dtype, bad)
        t = torch.ones(64, dtype=dtype)
        t[3], t[9] = float("inf"), -float("inf")           # they would cancel to NaN, not 0
        assert not _all_finite(t)


def test_the_heap_watch_trims_growth_not_the_working_set(monkeypatch):
    """A trim is followed by a new measure of the working set (what the next batch faults back
    in), so a working set above the first measure does not trim after every batch."""
    import mergekit_permute.calibration.heap as heap
    resident, trims = [100 << 20], []
    monkeypatch.setattr(heap, "heap_bytes", lambda: resident[0])
    monkeypatch.setattr(heap, "trim_heap", lambda: trims.append(resident[0]))
    watch = heap.HeapWatch(slack=8 << 20)
    watch.settle()
    for level in [104, 120, 112, 119, 120, 125, 118, 119, 126]:   # MiB after each batch
        resident[0] = level << 20
        watch.check()
    # 120 > 100 + 8: trim; 112 (the next batch) is the working set; 119 and 120 are within
    # its slack; 125 > 120: trim; 118 is the new measure; 119 and 126 are within its slack
    assert [t >> 20 for t in trims] == [120, 125]
    assert watch.base == 118 << 20


def test_narrower_floats_are_widened_as_they_are_streamed(tmp_path, monkeypatch):
    """A float32 tensor written into a float64 layout: widened a slice at a time, read back
    exactly; anything else that does not match the layout is refused."""
    import mergekit_permute.io.checkpoints as checkpoints
    from safetensors.torch import load_file as load
    monkeypatch.setattr(checkpoints, "WIDEN_SLICE", 7)   # slices that do not divide the size
    tensors = {"sums": torch.randn(10, 9), "empty": torch.zeros(0), "count": torch.tensor(3.0)}
    layout = [(k, tuple(t.shape), torch.float64) for k, t in tensors.items()]
    checkpoints.stream_safetensors(tmp_path / "w.safetensors", layout, tensors.__getitem__)
    back = load(str(tmp_path / "w.safetensors"))
    assert all(back[k].dtype == torch.float64 and torch.equal(back[k], t.double())
               for k, t in tensors.items())
    with pytest.raises(RuntimeError, match="expected"):
        checkpoints.stream_safetensors(tmp_path / "x.safetensors",
                                       [("sums", (10, 9), torch.float16)], tensors.__getitem__)


def test_a_host_process_keeps_its_allocator_settings(zoo, monkeypatch):
    """Inside MergeKit or a notebook (not our CLI), an alignment never calls mallopt: glibc's
    settings, once changed, cannot be restored."""
    from mergekit_permute.calibration import heap
    calls = []

    class Libc:
        def mallopt(self, *args):
            calls.append(args)

        def malloc_trim(self, *args):
            return 0
    monkeypatch.setattr(heap, "_libc", lambda: Libc())
    monkeypatch.setitem(heap._owned, "heap", False)
    a, b = zoo("llama")
    align(a, b, "shakespeare-calib", SETTINGS, workers=1)
    assert calls == []
    heap.own_heap()
    assert calls


def test_the_scale_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/scale.py end to end at its CI-sized shape (the real widths run by hand):
    floor, align, learned with and without recomputed blocks, the results file."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "scale.py"), "--shape", "toy",
                        "--layers", "2", "--repeats", "1", "--no-cached", "--no-solve",
                        "--learned", "1", "--learned-whole-model", "--work", str(tmp_path),
                        "--results", str(out)], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    default = row["variants"]["default"]
    assert default["time_vs_floor"] > 0 and default["peak_above_import_mib"] > 0
    assert row["written_dtypes"] == ["BF16"]
    check = default["function_check"]
    assert check["aligned_vs_b"] <= 4 * check["rounding_baseline"]
    assert row["learned"]["steps"] == 1 and row["learned_whole_model"]["seconds"] > 0
