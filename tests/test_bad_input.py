"""Bad input is refused before expensive work, with a message that names problem and fix, and
nothing is written."""

import shutil

import pytest
import torch
import transformers as T
from click.testing import CliRunner

from mergekit_permute.cli import main
from mergekit_permute.calibration.stats import CrossStats
from mergekit_permute.settings import AlignSettings


def _variant(src: str, dst, **overrides):
    """A copy of a zoo model with a changed config (random weights), tokenizer kept."""
    config = T.AutoConfig.from_pretrained(src)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = getattr(T, config.architectures[0])(config)
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", dst / f)
    return str(dst)


def _align(a, b, out, *extra, data="shakespeare-calib"):
    return CliRunner().invoke(main, ["align", a, b, "--data", data, "--samples", "64",
                                     "--max-length", "32", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def variants(zoo, tmp_path_factory):
    a, b = zoo("bert")
    la, _ = zoo("llama")
    root = tmp_path_factory.mktemp("variants")
    nan_dir = root / "nan"
    model = T.BertForMaskedLM.from_pretrained(b)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(nan_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{b}/{f}", nan_dir / f)
    t5 = root / "t5"
    cfg = T.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    cfg.architectures = ["T5ForConditionalGeneration"]
    cfg.save_pretrained(t5)
    return {"a": a, "b": b, "llama": la,
            "layers": _variant(b, root / "layers", num_hidden_layers=3),
            "width": _variant(b, root / "width", intermediate_size=128),
            "nan": str(nan_dir), "t5": str(t5)}


@pytest.mark.parametrize("which,message", [
    ("llama", "model A is BertForMaskedLM but model B is LlamaForCausalLM"),
    ("layers", "layer counts differ: A has 2, B has 3"),
    ("width", "intermediate.dense.weight: shape (256, 64) in A but (128, 64) in B"),
    ("nan", "NaN or inf in ['bert.encoder.layer.0.output.dense.weight']"),
    ("t5", "'T5ForConditionalGeneration' is not supported by mergekit-permute. Supported: Bert"),
    ("missing", "does not exist"),
])
def test_incompatible_models_are_refused(variants, tmp_path, which, message):
    b = variants.get(which, str(tmp_path / "no-such-model"))
    a = variants["t5"] if which == "t5" else variants["a"]
    out = tmp_path / "out"
    r = _align(a, b, out)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()


def test_tokenizers_must_agree(variants, zoo, tmp_path):
    a, b = variants["a"], variants["b"]
    other = tmp_path / "b2"
    shutil.copytree(b, other)
    llama_tok = zoo("llama")[0]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{llama_tok}/{f}", other / f)
    # Same vocabulary size, different tokens: caught by the tokenizer check.
    tok = T.AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzzunseen"])
    tok.save_pretrained(other)
    r = _align(a, str(other), tmp_path / "out")
    assert r.exit_code == 2 and "different vocabularies" in r.output


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("", "holds no text"),
    ("Alas.\n", "at least 256 tokens are needed"),
    ('{"txt": "x"}\n', "no 'text' field"),
    ('[{"text": "x"}]\n', "got list - each line must hold one whole JSON object (JSON Lines)"),
    ('[\n  {"text": "x"}\n]\n', "not valid JSON (Expecting value) - each line must hold one"),
])
def test_bad_calibration_data(variants, tmp_path, content, message):
    data = tmp_path / ("calib.jsonl" if content and content[0] in "{[" else "calib.txt")
    if content is not None:
        data.write_text(content)
    r = _align(variants["a"], variants["b"], tmp_path / "out", data=str(data))
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(variants, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("precious")
    r = _align(variants["a"], variants["b"], out)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (out / "model.safetensors").read_text() == "precious"
    r = _align(variants["a"], variants["b"], out, "--overwrite")   # not ours: never replaced
    assert r.exit_code == 2 and "did not write" in r.output
    assert (out / "model.safetensors").read_text() == "precious"
    (out / "model.safetensors").unlink()
    assert _align(variants["a"], variants["b"], out).exit_code == 0       # empty: fine
    r = _align(variants["a"], variants["b"], out, "--overwrite")          # ours: replaced
    assert r.exit_code == 0, r.output
    assert (out / "alignment.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--samples", "0"], "samples"),
    (["--attention", "heads"], "Invalid value for '--attention'"),
])
def test_bad_options(variants, tmp_path, args, message):
    r = _align(variants["a"], variants["b"], tmp_path / "out", *args)
    assert r.exit_code == 2 and message in r.output


@pytest.mark.parametrize("value,expected", [(0.5, "0.5"), ("1e-1", "0.1"), ("4e-1-6e-1", "0.4-0.6"),
                                            (".25/.5/.75", "0.25/0.5/0.75")])
def test_recipe_lambdas_may_be_yaml_numbers_or_exponents(value, expected):
    settings, _ = AlignSettings.from_recipe({"matching": "learned", "learn_lambdas": value})
    assert settings.learn_lambdas == expected


def test_zero_variance_and_low_precision_features_give_finite_correlations():
    s = CrossStats.zeros(3, 3)
    a = torch.randn(50, 3, dtype=torch.bfloat16) * 3e4  # large values: overflow-prone in 16 bits
    a[:, 1] = 7.0                                        # a constant (dead) feature
    b = torch.randn(50, 3, dtype=torch.float16) * 6e4
    s.update(a, b)
    corr = s.correlation()
    assert torch.isfinite(corr).all()
    assert torch.all(corr[1] == 0)
    from mergekit_permute.core.match import match_plain
    perm, _ = match_plain(corr)
    assert sorted(perm.tolist()) == [0, 1, 2]


def test_stats_are_additive():
    a, b = torch.randn(40, 4), torch.randn(40, 5)
    whole, first, second = (CrossStats.zeros(4, 5) for _ in range(3))
    whole.update(a, b)
    first.update(a[:15], b[:15])
    second.update(a[15:], b[15:])
    torch.testing.assert_close((first + second).correlation(), whole.correlation())
    ref = torch.corrcoef(torch.cat([a, b], 1).T.double())[:4, 4:]
    torch.testing.assert_close(whole.correlation(), ref)


def test_a_config_without_architectures_names_the_fix(zoo, tmp_path):
    """Old configs may lack `architectures`: refused at once, saying what to set."""
    import json
    a, b = zoo("llama")
    bare = tmp_path / "bare"
    shutil.copytree(b, bare)
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]
    (bare / "config.json").write_text(json.dumps(config))
    r = _align(a, str(bare), tmp_path / "out")
    assert r.exit_code != 0
    assert "config.json" in r.output and '"architectures"' in r.output, r.output
    assert not (tmp_path / "out").exists()
