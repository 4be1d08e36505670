"""REPAIR: the merged model's FF statistics are corrected to the interpolated targets, block
by block, through the barrier sweep and through a MergeKit recipe."""

import json

import torch
import transformers as T
from safetensors.torch import load_file

from mergekit_permute.calibration.blocks import BlockModel
from mergekit_permute.io.checkpoints import StateSource, average_states
from mergekit_permute.io.models import open_pair
from mergekit_permute.align.pipeline import align_pair
from mergekit_permute.calibration.collect import prepare_calibration
from mergekit_permute.align.repair import Moments, measure, reader_of, repair, repairable_spaces
from mergekit_permute.settings import AlignSettings
from tests.conftest import invoke
from tests.test_merge import PARAMS, recipe

SETTINGS = AlignSettings(samples=120, max_length=32, residual="all")


def _merge_in_memory(zoo, arch):
    """A and aligned B, their FF moments, and the REPAIRed average (in memory)."""
    a, b = zoo(arch)
    alignment, model_a, model_b, _ = align_pair(a, b, "shakespeare-calib", SETTINGS)
    pair = open_pair(a, b)
    spec, calib = pair.spec, prepare_calibration(pair, "shakespeare-calib", SETTINGS)
    parents = [{k: v.clone() for k, v in model_a.state_dict().items()},
               alignment.state_dict(model_b.state_dict())]

    def runner(state):
        return BlockModel.skeleton(spec, pair.config, StateSource(state, spec))
    moments = [measure(runner(st), spec, calib.batches, calib.masks) for st in parents]
    targets = {s: Moments.mix([(1.0, m[s]) for m in moments]) for s in moments[0]}
    plain = average_states([(1.0, st) for st in parents])
    corrected, report = repair(runner(plain), spec, targets, calib.batches, calib.masks)
    return spec, pair, calib, plain, {**plain, **corrected}, moments, report, runner


def test_repair_folds_the_exact_affine_correction_into_the_readers(zoo):
    """Layer 0's FF features are upstream of every correction, so its fold can be checked
    exactly: reader'(a) == reader(s * (a - mean_merged) + mean_target), s = std_target /
    std_merged (BERT: bias present), or reader(s * a) with s = rms_target / rms_merged (Llama)."""
    for arch in ("bert", "llama"):
        spec, pair, calib, plain, merged, moments, report, runner = _merge_in_memory(zoo, arch)
        space = next(s for s in repairable_spaces(spec) if spec.space(s).layer == 0)
        m = measure(runner(plain), spec, calib.batches, calib.masks)[space]
        t_mean = (moments[0][space].mean + moments[1][space].mean) / 2
        t_std = (moments[0][space].std + moments[1][space].std) / 2
        reader = reader_of(spec, space)
        w, w_rep = plain[reader.weight].double(), merged[reader.weight].double()
        cols = w.movedim(reader.axis, -1)        # [out, n] either way round (Conv1D or Linear)
        cols_rep = w_rep.movedim(reader.axis, -1)
        if arch == "bert":
            scale = t_std / m.std
            shift = t_mean - scale * m.mean
            bias = plain[reader.bias].double() + cols @ shift
            torch.testing.assert_close(merged[reader.bias].double(), bias, rtol=1e-5, atol=1e-6)
        else:
            assert reader.bias is None
            scale = ((t_std**2 + t_mean**2) / m.sq).sqrt()
        torch.testing.assert_close(cols_rep, cols * scale, rtol=1e-5, atol=1e-6)
        assert all(v > 0.01 for v in report.values())  # there was variance collapse to undo
        # Nothing but the FF readers (and their biases) changed.
        readers = set()
        for s in repairable_spaces(spec):
            r = reader_of(spec, s)
            readers |= {r.weight, r.bias}
        for k, v in merged.items():
            if k in readers:
                assert not torch.allclose(v, plain[k]), k
            else:
                assert torch.equal(v, plain[k]), k


def test_mergekit_recipe_with_repair_writes_the_repaired_model(zoo, tmp_path):
    a, b = zoo("bert")
    _, _, _, _, expected, *_ = _merge_in_memory(zoo, "bert")
    out = tmp_path / "merged"
    r = invoke("mergekit-yaml", str(recipe(tmp_path, a, b, {**PARAMS, "repair": True})),
                str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    merged = load_file(f"{out}/model.safetensors")
    for k, v in merged.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-5, msg=k)
    with torch.no_grad():  # loads and runs as a standard checkpoint
        logits = T.AutoModelForMaskedLM.from_pretrained(out)(input_ids=torch.tensor([[2, 5, 3]])).logits
    assert torch.isfinite(logits).all()
    assert "REPAIR" in (out / "README.md").read_text()


def test_barrier_repair_method_runs_and_keeps_endpoints(zoo, tmp_path):
    a, b = zoo("llama")
    r = invoke("mergekit-permute", "barrier", a, b, "--data", "shakespeare-eval",
                "--calibration", "shakespeare-calib", "--samples", "120", "--max-length", "32",
                "--eval-samples", "48", "--lambdas", "3", "--methods", "default,default+repair",
                "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "b" / "barrier.json").read_text())
    plain, repaired = doc["methods"]["default"], doc["methods"]["default+repair"]
    assert repaired["settings"]["repair"] is True
    # Endpoints are the parents themselves (no correction at lambda 0 and 1).
    assert repaired["losses"][0] == plain["losses"][0] and repaired["losses"][-1] == plain["losses"][-1]
    assert repaired["losses"][1] < plain["losses"][1]


def test_caught_block_calls_hold_no_hidden_states(zoo):
    """The embeddings' output is kept once (where calibration parks it: the host when the GPU
    is short), not again inside every block's recorded call; running a block from the call
    and a given hidden state is what running the model does."""
    a, b = zoo("llama")
    pair = open_pair(a, b)
    calib = prepare_calibration(pair, "shakespeare-calib", SETTINGS)
    model = T.AutoModelForCausalLM.from_pretrained(a)
    runner = BlockModel.skeleton(pair.spec, pair.config,
                                 StateSource(model.state_dict(), pair.spec))
    batch = calib.batches[0]
    runner.load(None)
    hidden, calls = runner.catch(batch)
    for args, kwargs in calls:
        assert (args[0] if args else kwargs["hidden_states"]) is None
    runner.load(0)
    out = runner.run(0, hidden, calls[0])
    with torch.no_grad():
        want = model(**{k: v for k, v in batch.items()}, output_hidden_states=True)
    torch.testing.assert_close(out, want.hidden_states[1], rtol=1e-5, atol=1e-5)
