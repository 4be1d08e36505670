"""REPAIR: the merged model's FF statistics are corrected to the interpolated targets, through
the barrier sweep and through a MergeKit recipe."""

import json

import torch
import transformers as T
from safetensors.torch import load_file

from mergekit_permute.align import AlignSettings, align_pair
from mergekit_permute.calibrate import tokenize
from mergekit_permute.data import load_texts
from mergekit_permute.permute import apply_to_state_dict
from mergekit_permute.repair import measure, reader_of, repair_merge, repairable_spaces
from tests.conftest import cli, run_cli
from tests.test_merge import PARAMS, recipe

SETTINGS = AlignSettings(samples=120, max_length=32, residual="all")


def _merge_in_memory(zoo, arch):
    a, b = zoo(arch)
    alignment, model_a, model_b, tok = align_pair(a, b, "shakespeare-calib", SETTINGS)
    spec = alignment.spec
    aligned_b = apply_to_state_dict(spec, model_b.state_dict(), alignment.transforms)
    batches = tokenize(tok, load_texts("shakespeare-calib", 120), 32, 8, model_a)
    parents = [(1.0, {k: v.clone() for k, v in model_a.state_dict().items()}), (1.0, aligned_b)]
    spaces = repairable_spaces(spec)
    moments = []
    for _, state in parents:
        model_a.load_state_dict(state)
        moments.append(measure(model_a, spec, spaces, batches))
    merged, report = repair_merge(model_a, spec, parents, batches)
    return spec, model_a, merged, moments, batches, report, parents


def test_repair_folds_the_exact_affine_correction_into_the_readers(zoo):
    """Layer 0's FF features are upstream of every correction, so its fold can be checked
    exactly: reader'(a) == reader(s * (a - mean_merged) + mean_target), s = std_target /
    std_merged (BERT: bias present), or reader(s * a) with s = rms_target / rms_merged (Llama)."""
    for arch in ("bert", "llama"):
        spec, model, merged, moments, batches, report, parents = _merge_in_memory(zoo, arch)
        plain = {k: (parents[0][1][k] + parents[1][1][k]) / 2 if v.is_floating_point() else v
                 for k, v in parents[0][1].items()}
        model.load_state_dict(plain)
        space = next(s for s in repairable_spaces(spec) if spec.space(s).layer == 0)
        m = measure(model, spec, [space], batches)[space]
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
                torch.testing.assert_close(v, plain[k], rtol=0, atol=1e-6, msg=k)


def test_mergekit_recipe_with_repair_writes_the_repaired_model(zoo, tmp_path):
    a, b = zoo("bert")
    spec, _, expected, *_ = _merge_in_memory(zoo, "bert")
    out = tmp_path / "merged"
    r = run_cli(cli("mergekit-yaml"), str(recipe(tmp_path, a, b, {**PARAMS, "repair": True})),
                str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    merged = load_file(f"{out}/model.safetensors")
    for k, v in merged.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-5, msg=k)
    with torch.no_grad():  # loads and runs as a standard checkpoint
        logits = T.AutoModelForMaskedLM.from_pretrained(out)(input_ids=torch.tensor([[2, 5, 3]])).logits
    assert torch.isfinite(logits).all()
    assert "repair" in (out / "README.md").read_text()


def test_barrier_repair_method_runs_and_keeps_endpoints(zoo, tmp_path):
    a, b = zoo("llama")
    r = run_cli(cli("mergekit-permute"), "barrier", a, b, "--data", "shakespeare-eval",
                "--calibration", "shakespeare-calib", "--samples", "120", "--max-length", "32",
                "--eval-samples", "48", "--lambdas", "3", "--methods", "default,default+repair",
                "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "b" / "barrier.json").read_text())
    plain, repaired = doc["methods"]["default"], doc["methods"]["default+repair"]
    assert repaired["settings"]["repair"] is True
    # Endpoints are the parents themselves (no correction at lambda 0 and 1).
    assert repaired["losses"][0] == plain["losses"][0] and repaired["losses"][-1] == plain["losses"][-1]
    assert repaired["losses"][1] != plain["losses"][1]
