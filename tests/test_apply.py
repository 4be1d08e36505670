"""Reusable alignments: `align --permutations-only` then `apply` to B or to a fine-tune of B."""

import hashlib

import torch
import transformers as T
from click.testing import CliRunner

from mergekit_permute.cli import main

ARGS = ["--data", "shakespeare-calib", "--samples", "120", "--max-length", "32"]


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_apply_reproduces_align_and_transfers_to_a_finetune(zoo, tmp_path):
    a, b = zoo("llama")
    run = CliRunner().invoke
    assert run(main, ["align", a, b, *ARGS, "--out", str(tmp_path / "full")]).exit_code == 0
    r = run(main, ["align", a, b, *ARGS, "--permutations-only", "--out", str(tmp_path / "perm")])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "perm" / "model.safetensors").exists()
    r = run(main, ["apply", str(tmp_path / "perm"), b, "--out", str(tmp_path / "applied")])
    assert r.exit_code == 0, r.output
    assert _sha(tmp_path / "applied" / "model.safetensors") == \
        _sha(tmp_path / "full" / "model.safetensors")
    # A "fine-tune" of B: same architecture, nudged weights; apply keeps its function.
    tuned = T.AutoModelForCausalLM.from_pretrained(b)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned.save_pretrained(tmp_path / "tuned")
    T.AutoTokenizer.from_pretrained(b).save_pretrained(tmp_path / "tuned")
    r = run(main, ["apply", str(tmp_path / "perm" / "permutations.safetensors"),
                   str(tmp_path / "tuned"), "--out", str(tmp_path / "tuned-aligned")])
    assert r.exit_code == 0, r.output
    ids = torch.tensor([[2, 50, 60, 70, 80]])
    with torch.no_grad():
        x = T.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned-aligned")(input_ids=ids).logits
        y = tuned(input_ids=ids).logits
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_apply_refuses_a_mismatched_checkpoint(zoo, tmp_path):
    a, b = zoo("llama")
    bert, _ = zoo("bert")
    run = CliRunner().invoke
    assert run(main, ["align", a, b, *ARGS, "--permutations-only",
                      "--out", str(tmp_path / "perm")]).exit_code == 0
    r = run(main, ["apply", str(tmp_path / "perm"), bert, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "made for LlamaForCausalLM" in r.output
    assert not (tmp_path / "x").exists()
