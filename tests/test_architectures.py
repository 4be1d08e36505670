"""Every supported architecture end to end: `align` output computes B's function, and a stock
`mergekit-yaml` merge with merge_method: permute loads and runs (random-init pairs)."""

import json

import pytest
import torch
import transformers as T
import yaml
from click.testing import CliRunner

from mergekit_permute.align.pipeline import align_pair
from mergekit_permute.settings import AlignSettings

ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
           max_position_embeddings=64)
DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=48, max_position_embeddings=64)
ARCHS = {
    "BertForPreTraining": (T.BertConfig, ENC),
    "BertModel": (T.BertConfig, ENC),
    "BertForSequenceClassification": (T.BertConfig, {**ENC, "num_labels": 2}),
    "RobertaForMaskedLM": (T.RobertaConfig, {**ENC, "max_position_embeddings": 70}),
    "RobertaModel": (T.RobertaConfig, {**ENC, "max_position_embeddings": 70}),
    "RobertaForSequenceClassification": (T.RobertaConfig, {**ENC, "max_position_embeddings": 70,
                                                           "num_labels": 3}),
    "GPT2LMHeadModel": (T.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "GPTNeoXForCausalLM": (T.GPTNeoXConfig, {**{k: v for k, v in DEC.items()
                                                 if k != "num_key_value_heads"},
                                              "rotary_pct": 0.25}),
    "MistralForCausalLM": (T.MistralConfig, DEC),
    "Qwen2ForCausalLM": (T.Qwen2Config, {**DEC, "tie_word_embeddings": True}),
    "Qwen3ForCausalLM": (T.Qwen3Config, {**DEC, "head_dim": 8}),
}
# Permutations only, so the merge is (A + aligned B)/2 with A as stored (orthogonal: test_orthogonal).
SETTINGS = AlignSettings(samples=64, max_length=32, batch_size=16, residual="all")


@pytest.fixture(scope="module")
def pairs(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    tokenizers = {"enc": zoo("bert")[0], "dec": zoo("llama")[0]}
    cache = {}

    def get(arch):
        if arch not in cache:
            cls, kw = ARCHS[arch]
            tok_src = tokenizers["enc" if "Bert" in arch or "Roberta" in arch else "dec"]
            tok = T.AutoTokenizer.from_pretrained(tok_src)
            extra = {"pad_token_id": 0} if cls is not T.GPT2Config else {"bos_token_id": 2,
                                                                         "eos_token_id": 3}
            paths = []
            for seed in (0, 1):
                config = cls(vocab_size=len(tok), **kw, **extra)
                config.architectures = [arch]
                torch.manual_seed(seed)
                model = getattr(T, arch)(config)
                path = root / f"{arch}-{seed}"
                model.save_pretrained(path)
                tok.save_pretrained(path)
                paths.append(str(path))
            cache[arch] = paths
        return cache[arch]
    return get


def _outputs(model, tok):
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(["Good morrow, my lord.", "Now is the winter of our discontent."],
              return_tensors="pt", padding=True)
    enc.pop("token_type_ids", None)
    with torch.no_grad():
        out = model.eval()(**enc)
    return [getattr(out, k) for k in ("logits", "prediction_logits", "last_hidden_state",
                                      "seq_relationship_logits", "pooler_output")
            if getattr(out, k, None) is not None]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_align_preserves_function_and_stock_mergekit_merges(pairs, tmp_path, arch):
    a, b = pairs(arch)
    alignment, _, model_b, tok = align_pair(a, b, "shakespeare-calib", SETTINGS)
    reference = getattr(T, arch).from_pretrained(b)
    alignment.apply_to_model(model_b)
    for x, y in zip(_outputs(model_b, tok), _outputs(reference, tok)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    moved = [k for k, v in model_b.state_dict().items()
             if not torch.equal(v, reference.state_dict()[k])]
    assert moved

    from mergekit.scripts.run_yaml import main as mergekit_yaml
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "permute", "base_model": a, "dtype": "float32",
        "models": [{"model": a}, {"model": b}],
        "parameters": {"calibration_samples": 64, "max_length": 32, "batch_size": 16,
                       "residual": "all"}}))
    r = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    merged = getattr(T, arch).from_pretrained(tmp_path / "merged")
    assert all(torch.isfinite(x).all() for x in _outputs(merged, tok))
    base = getattr(T, arch).from_pretrained(a)
    for k, v in merged.state_dict().items():
        expected = (base.state_dict()[k] + model_b.state_dict()[k]) / 2
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6, msg=k)


def test_classifier_barrier_uses_task_loss(pairs, tmp_path):
    from mergekit_permute.barrier import run_barrier
    from mergekit_permute.evaluate import Evaluation
    a, b = pairs("RobertaForSequenceClassification")
    data = tmp_path / "cls.jsonl"
    lines = [json.dumps({"text": t, "label": i % 3}) for i, t in enumerate(
        ["Good morrow.", "Alas, poor Yorick.", "To be, or not to be.", "Out, damned spot!"] * 4)]
    data.write_text("\n".join(lines))
    r = run_barrier(a, b, evaluation=Evaluation(str(data), lambdas=3),
                    calibration="shakespeare-calib", methods=["vanilla", "default"],
                    settings=SETTINGS)
    assert r["objective"] == "cls" and "classification" in r["loss"]
    assert all(len(m["losses"]) == 3 for m in r["methods"].values())


def _as_the_hub_ships(path, arch: str) -> None:
    """Rewrite a saved checkpoint the way real published ones look: the original GPT-2 files
    without the `transformer.` prefix; bert-base-uncased as BertForMaskedLM that still ships
    its pooler and next-sentence head."""
    from safetensors.torch import load_file, save_file
    file = path / "model.safetensors"
    state = load_file(file)
    if arch == "GPT2LMHeadModel":
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    save_file(state, file, metadata={"format": "pt"})
    if arch == "BertForPreTraining":   # saved as pretraining, published as MLM
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config,
                                                      "architectures": ["BertForMaskedLM"]}))


@pytest.mark.parametrize("arch,layout", [("GPT2LMHeadModel", "no transformer. prefix"),
                                         ("BertForPreTraining", "MLM shipping pooler + NSP"),
                                         ("GPTNeoXForCausalLM", "attention_bias=False")])
def test_checkpoints_as_published_align_and_merge(zoo, tmp_path, arch, layout):
    """Layouts real checkpoints have: accepted, aligned with B's function kept and its tensor
    names kept, and merged by stock mergekit-yaml."""
    from safetensors import safe_open
    from tests.conftest import invoke
    cls, kw = ARCHS[arch]
    tok = T.AutoTokenizer.from_pretrained(zoo("bert" if "Bert" in arch else "llama")[0])
    extra = {"pad_token_id": 0} if cls is not T.GPT2Config else {"bos_token_id": 2,
                                                                 "eos_token_id": 3}
    if arch == "GPTNeoXForCausalLM":
        extra["attention_bias"] = False
    paths = []
    for seed in (0, 1):
        config = cls(vocab_size=len(tok), **kw, **extra)
        config.architectures = [arch]
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}"
        getattr(T, arch)(config).save_pretrained(path)
        tok.save_pretrained(path)
        _as_the_hub_ships(path, arch)
        paths.append(path)
    loads_as = T.BertForMaskedLM if arch == "BertForPreTraining" else getattr(T, arch)
    out = tmp_path / "aligned"
    r = invoke("mergekit-permute", "align", *paths, "--data", "shakespeare-calib", "--samples",
               64, "--max-length", 32, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    keys = [set(safe_open(p / "model.safetensors", "pt").keys()) for p in (paths[1], out)]
    assert keys[0] == keys[1]
    for x, y in zip(_outputs(loads_as.from_pretrained(out), tok),
                    _outputs(loads_as.from_pretrained(paths[1]), tok)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "permute", "base_model": str(paths[0]), "dtype": "float32",
        "models": [{"model": str(p)} for p in paths],
        "parameters": {"calibration_samples": 64, "max_length": 32}}))
    r = invoke("mergekit-yaml", recipe, tmp_path / "merged")
    assert r.returncode == 0, r.stdout + r.stderr
    merged = loads_as.from_pretrained(tmp_path / "merged")
    assert all(torch.isfinite(x).all() for x in _outputs(merged, tok))
