"""The function check written into alignment.json and the card: aligned B against B, next to
what storing B's own float32 original in the written dtype costs."""

import json
import shutil

import pytest
import torch
import transformers as T

from mergekit_permute.io.checkpoints import Checkpoint, CheckpointSource
from mergekit_permute.io.fidelity import _Noisy, fidelity, probe_ids, streamed_logits
from mergekit_permute.io.models import load_config, open_checkpoint
from mergekit_permute.spec import spec_for_config
from tests.conftest import cli, invoke, run_cli
from tests.tiny import build


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "LlamaForCausalLM-tied", "BertForMaskedLM",
                                  "GPT2LMHeadModel", "GPTNeoXForCausalLM", "BertModel"])
def test_streamed_logits_are_the_model_classes_own(name, tmp_path):
    """Module by module from the checkpoint: the same float32 logits as the loaded model."""
    model = build(name)
    model.save_pretrained(tmp_path)
    spec = spec_for_config(model.config)
    ids = probe_ids(model.config)
    with torch.no_grad():
        out = model(input_ids=ids)
    want = out.logits if hasattr(out, "logits") else getattr(out, "prediction_logits", None)
    want = out.last_hidden_state if want is None else want
    got = streamed_logits(spec, model.config, CheckpointSource(Checkpoint(str(tmp_path)), spec), ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_emulated_float32_original_rounds_back_to_b_exactly():
    gen = torch.Generator().manual_seed(0)
    b = {"w": (torch.randn(64, 64, generator=gen) * 10.0 ** torch.randint(-6, 3, (64, 64),
                                                                       generator=gen)).bfloat16()}
    b["w"][0, :5] = 0
    noisy = _Noisy(type("S", (), {"get": lambda self, n: b[n]})(), torch.bfloat16).get("w")
    assert noisy.dtype == torch.float32 and not torch.equal(noisy, b["w"].float())
    assert torch.equal(noisy.bfloat16(), b["w"])


def _bf16_copy(src: str, dst) -> str:
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (p := (__import__("pathlib").Path(src) / f)).exists():
            shutil.copy(p, dst)
    return str(dst)


def test_align_records_bf16_rounding_next_to_its_baseline(zoo, tmp_path):
    """A rotated residual stored in bf16 costs about what storing B's own float32 original
    in bf16 does (not more than a small multiple); float32 output is exact."""
    a, b = zoo("llama")
    a16, b16 = _bf16_copy(a, tmp_path / "a16"), _bf16_copy(b, tmp_path / "b16")
    r = run_cli(cli("mergekit-permute"), "align", a16, b16, "--data", "shakespeare-calib",
                "--samples", "64", "--max-length", "32", "--residual", "orthogonal",
                "--cache", "off", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.loads((tmp_path / "out" / "alignment.json").read_text())["function_check"]
    assert check["dtype"] == "bfloat16"
    assert 0 < check["aligned_vs_b"] <= 3 * check["rounding_baseline"], check
    assert check["rounding_baseline"] < 0.05
    # the same alignment written in float32: exact up to float32 rounding
    spec = spec_for_config(load_config(b16))
    r = run_cli(cli("mergekit-permute"), "apply", str(tmp_path / "out"), b16, "--dtype", "float32",
                "--out", str(tmp_path / "out32"))
    assert r.returncode == 0, r.stderr[-2000:]
    check32 = json.loads((tmp_path / "out32" / "alignment.json").read_text())["function_check"]
    assert check32["dtype"] == "float32" and check32["aligned_vs_b"] < 1e-5, check32
    again = fidelity(spec, load_config(b16), open_checkpoint(b16, spec),
                     Checkpoint(str(tmp_path / "out32")))
    assert again == check32   # deterministic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_emulated_original_rounds_back_across_binades(dtype):
    """Powers of two (where the spacing halves below), the largest and smallest normals,
    subnormals and both signs: the emulated original always rounds back to B."""
    info = torch.finfo(dtype)
    edges = torch.tensor([1.0, 2.0, 0.5, 1024.0, info.max, info.tiny, info.tiny / 4,
                          info.smallest_normal * 3, 3.0, 1.5]).to(dtype)
    b = torch.cat([edges, -edges]).repeat(2000)
    source = type("S", (), {"get": lambda self, n: b})()
    noisy = _Noisy(source, dtype).get("w")
    assert torch.equal(noisy.to(dtype), b)
    assert (noisy != b.float()).float().mean() > 0.9   # (noise nearly everywhere)


def test_float16_from_bf16_is_rounded_once_and_never_overflows(zoo, tmp_path):
    """bf16 in, float16 out: the transform's float32 result rounded once (what float32 output
    rounds to), and a value beyond float16's range refused instead of written as inf."""
    from safetensors.torch import load_file, save_file
    a, b = zoo("llama")
    a16, b16 = _bf16_copy(a, tmp_path / "a16"), _bf16_copy(b, tmp_path / "b16")
    aln = tmp_path / "aln"
    r = invoke("mergekit-permute", "align", a16, b16, "--data", "shakespeare-calib",
                "--samples", "64", "--max-length", "32", "--residual", "orthogonal",
                "--cache", "off", "--permutations-only", "--out", str(aln))
    assert r.returncode == 0, r.stderr[-2000:]
    outs = {}
    for dtype in ("float16", "float32"):
        r = invoke("mergekit-permute", "apply", str(aln), b16, "--dtype", dtype,
                    "--out", str(tmp_path / dtype))
        assert r.returncode == 0, r.stderr[-2000:]
        outs[dtype] = load_file(str(tmp_path / dtype / "model.safetensors"))
    for k, t in outs["float16"].items():
        assert torch.equal(t, outs["float32"][k].half()), k
    weights = tmp_path / "b16" / "model.safetensors"
    tensors = load_file(str(weights))
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 1e8   # fine in bf16; beyond float16's 65504 (even spread by a rotation)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    r = invoke("mergekit-permute", "apply", str(aln), b16, "--dtype", "float16",
                "--out", str(tmp_path / "big"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{key}: values beyond torch.float16's range" in r.stderr
    assert not (tmp_path / "big").exists()
