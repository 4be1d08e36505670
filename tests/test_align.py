import json
import shutil

import pytest
import torch
import transformers as T
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_permute.core.alignment import read_alignment_files
from mergekit_permute.calibration.calibrate import calibrate
from mergekit_permute.io.batches import tokenize
from mergekit_permute.cli import main
from mergekit_permute.io.data import load_texts
from mergekit_permute.io.models import load_model, open_pair
from mergekit_permute.core.permute import apply_to_model, random_transforms
from mergekit_permute.align.pipeline import align_pair
from mergekit_permute.calibration.collect import Workload, prepare_calibration, statistics
from mergekit_permute.settings import AlignSettings
from mergekit_permute.align.solve import compute_alignment, qk_matched
from mergekit_permute.spec import spec_for_config

ALIGN_ARGS = ["--data", "shakespeare-calib", "--samples", "120", "--max-length", "32"]
TEXTS = ["Good morrow, my lord.", "What light through yonder window breaks?"]


def _logits(path_or_model, tok_path, texts=TEXTS):
    model = (T.AutoModelForMaskedLM if "bert" in str(tok_path) else T.AutoModelForCausalLM)
    m = path_or_model if not isinstance(path_or_model, str) else model.from_pretrained(path_or_model)
    tok = T.AutoTokenizer.from_pretrained(tok_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    enc.pop("token_type_ids", None)
    with torch.no_grad():
        return m.eval()(**enc).logits


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_align_output_computes_b_and_is_permuted(zoo, tmp_path, arch):
    a, b = zoo(arch)
    out = tmp_path / "aligned"
    # Permutations only, so the stored weights are a reordering of B's (orthogonal: its own test).
    r = CliRunner().invoke(main, ["align", a, b, *ALIGN_ARGS, "--residual", "all",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(_logits(str(out), b), _logits(b, b), rtol=1e-5, atol=1e-5)
    wa, wb, wo = (load_file(f"{p}/model.safetensors") for p in (a, b, out))
    ffn = "bert.encoder.layer.0.intermediate.dense.weight" if arch == "bert" else \
        "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(wo[ffn], wb[ffn])
    assert torch.equal(wo[ffn].flatten().sort().values, wb[ffn].flatten().sort().values)  # moved only
    assert (wo[ffn] - wa[ffn]).norm() < (wb[ffn] - wa[ffn]).norm()   # B' is closer to A
    doc = json.loads((out / "alignment.json").read_text())
    assert doc["settings"]["attention"] == "head_perm" and doc["function_preserving"]
    assert doc["data"]["tokens"] > 0 and len(doc["data"]["fingerprint"]) == 16
    assert doc["label"].startswith("matching=activations,ffn=permute,attention=head_perm")
    # The report describes the written model: A's and the aligned B's FF features, measured
    # afresh on the calibration text, correlate neuron by neuron as alignment.json says.
    model_a, aligned = load_model(a), load_model(str(out))
    spec = spec_for_config(model_a.config)
    batches = tokenize(T.AutoTokenizer.from_pretrained(a), load_texts("shakespeare-calib", 120),
                       32, 8, spec.architecture)
    stats = calibrate(model_a, aligned, spec, batches, ["ffn.1"])
    measured = float(stats["ffn.1@0"].correlation().diagonal().mean())
    assert measured == pytest.approx(doc["spaces"]["ffn.1"]["mean_corr_after"], abs=1e-5)
    assert doc["timings"]["solve_seconds"]["ffn.1"] >= 0 and doc["timings"]["total_seconds"] > 0
    transforms, gains, _ = read_alignment_files(out)
    assert transforms["ffn.0"][""].dtype == torch.long and not gains
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("arch,products", [("bert", "float32"), ("llama", "float32"),
                                            ("llama", "bfloat16")])
def test_alignment_recovers_a_random_permutation_of_itself(zoo, tmp_path, arch, products):
    a, _ = zoo(arch)
    model = T.AutoModelForMaskedLM.from_pretrained(a) if arch == "bert" else \
        T.AutoModelForCausalLM.from_pretrained(a)
    spec = spec_for_config(model.config)
    # Q/K take V's inner permutation: what V/O activation matching can see (the paper's rule).
    apply_to_model(spec, model, random_transforms(spec, seed=11, qk_follows_vo=True))
    permuted = tmp_path / "permuted"
    model.save_pretrained(permuted)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{a}/{f}", permuted / f)
    # (bfloat16 cross products in the statistics recover it as well as float32 ones)
    settings = AlignSettings(samples=120, max_length=32, residual="all", stats_products=products)
    alignment, model_a, model_b, _ = align_pair(a, str(permuted), "shakespeare-calib", settings,
                                                cache="refresh")
    alignment.apply_to_model(model_b)
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[k]), k
    # ... so the merge of A with its permuted copy is A itself.
    for space in alignment.report.values():
        assert space["mean_corr_after"] > 0.999


def test_ignore_heads_is_refused_by_align(zoo, tmp_path):
    a, b = zoo("bert")
    r = CliRunner().invoke(main, ["align", a, b, *ALIGN_ARGS, "--attention", "ignore_heads",
                                  "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not function-preserving" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("qk", ["separate", "joint"])
def test_qk_matching_keeps_b_function_and_matches_queries_better(zoo, qk):
    a, b = zoo("bert")
    settings = AlignSettings(samples=120, max_length=32, residual="all", qk=qk)
    alignment, model_a, model_b, tok = align_pair(a, b, "shakespeare-calib", settings)
    before = _logits(model_b, b)
    alignment.apply_to_model(model_b)
    torch.testing.assert_close(_logits(model_b, b), before, rtol=1e-5, atol=1e-5)
    # Against the paper's rule (Q/K follow V) on the same statistics: the query/key agreement
    # is higher; separate keeps the V/O assignment exactly, joint trades a little of it.
    pair = open_pair(a, b)
    stats = statistics(Workload(pair), prepare_calibration(pair, "shakespeare-calib", settings),
                       settings, qk=True)
    follow = compute_alignment(alignment.spec, stats, settings.model_copy(update={"qk": "follow_vo"}))
    for name, space in alignment.report.items():
        if space["kind"] != "attention":
            continue
        q, k = (stats[f"{name}@{v}"].correlation() for v in "qk")
        assert space["qk_corr_after"] > qk_matched(q, k, follow.transforms[name]) + 0.05
        if qk == "separate":
            assert space["mean_corr_after"] == follow.report[name]["mean_corr_after"]
    assert "qk=" + qk in alignment.settings.label()


def test_weight_matching_needs_no_data_and_keeps_b_function(zoo, tmp_path):
    a, b = zoo("llama")
    r = CliRunner().invoke(main, ["align", a, b, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--data is required" in r.output and "--matching weights" in r.output
    assert not (tmp_path / "x").exists()
    out = tmp_path / "aligned"
    r = CliRunner().invoke(main, ["align", a, b, "--matching", "weights", "--out", str(out)])
    assert r.exit_code == 0, r.output
    torch.testing.assert_close(_logits(str(out), b), _logits(b, b), rtol=1e-5, atol=1e-5)
    doc = json.loads((out / "alignment.json").read_text())
    assert doc["matching"] == "weights" and doc["settings"]["matching"] == "weights"
    wa, wb, wo = (load_file(f"{p}/model.safetensors") for p in (a, b, out))
    ffn = [k for k in wa if ".mlp." in k]
    distance = lambda w: sum(float((w[k] - wa[k]).norm() ** 2) for k in ffn)  # noqa: E731
    assert distance(wo) < 0.9 * distance(wb)   # B's FF weights moved towards A's
