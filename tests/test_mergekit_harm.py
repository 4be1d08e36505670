"""Do no harm: with mergekit-permute installed, stock MergeKit runs (every method but
`permute`) write byte-for-byte what MergeKit writes without the plugin. Each scenario runs
twice in a fresh process, once with the plugin and once with MERGEKIT_PERMUTE_DISABLE=1."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as T
import yaml

from tests.conftest import cli

ADDED = ["<extra_0>", "<extra_1>", "<extra_2>"]


@pytest.fixture(scope="module")
def models(zoo, tmp_path_factory):
    """A; B with added tokens (a larger vocabulary); A with a tied head; two GPT-2s."""
    a, b = zoo("llama")
    root = tmp_path_factory.mktemp("harm")
    out = {"a": a}
    tok = T.AutoTokenizer.from_pretrained(b)
    tok.add_tokens(ADDED)
    model = T.AutoModelForCausalLM.from_pretrained(b)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(root / "b_plus")
    tok.save_pretrained(root / "b_plus")
    out["b_plus"] = str(root / "b_plus")
    tied = T.AutoModelForCausalLM.from_pretrained(a)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(root / "a_tied")
    T.AutoTokenizer.from_pretrained(a).save_pretrained(root / "a_tied")
    out["a_tied"] = str(root / "a_tied")
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = T.GPT2Config(vocab_size=len(T.AutoTokenizer.from_pretrained(a)), n_embd=32,
                              n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=3)
        config.architectures = ["GPT2LMHeadModel"]
        T.GPT2LMHeadModel(config).save_pretrained(root / f"gpt2_{seed}")
        T.AutoTokenizer.from_pretrained(a).save_pretrained(root / f"gpt2_{seed}")
        out[f"gpt2_{seed}"] = str(root / f"gpt2_{seed}")
    return out


def _linear(models, *names, **top):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": models[n], "parameters": {"weight": 1.0}} for n in names], **top}


# Every scenario names its base_model: without one, MergeKit 0.1.5 takes config and tokenizer
# from `referenced_models()[0]`, a set of pydantic objects whose hash includes id(class), so
# the donor changes from process to process even without the plugin (measured: 1 of 4 stock
# runs of a tied + untied merge wrote a different config.json).
SCENARIOS = {
    "tokenizer_source_union": lambda m: ("yaml", _linear(m, "a", "b_plus", base_model=m["a"],
                                                         tokenizer_source="union"), []),
    "tokenizer_source_base": lambda m: ("yaml", _linear(m, "a", "b_plus", base_model=m["a"],
                                                        tokenizer_source="base"), []),
    "pad_to_multiple_of": lambda m: ("yaml", _linear(
        m, "a", "b_plus", base_model=m["a"],
        tokenizer={"source": "union", "pad_to_multiple_of": 64}), []),
    "tied_and_untied_llama_base_tied": lambda m: ("yaml", _linear(m, "a_tied", "a",
                                                                  base_model=m["a_tied"]), []),
    "tied_and_untied_llama_base_untied": lambda m: ("yaml", _linear(m, "a_tied", "a",
                                                                    base_model=m["a"]), []),
    "gpt2": lambda m: ("yaml", _linear(m, "gpt2_0", "gpt2_1", base_model=m["gpt2_0"]), []),
    "slerp": lambda m: ("yaml", {"merge_method": "slerp", "base_model": m["a"], "dtype": "float32",
                                 "models": [{"model": m["a"]}, {"model": m["a_tied"]}],
                                 "parameters": {"t": 0.3}}, []),
    "unsafe_truncate_embeddings": lambda m: ("yaml", _linear(m, "a", "b_plus", base_model=m["a"]),
                                             ["--unsafe-truncate-embeddings"]),
    "tokensurgeon": lambda m: ("tokensurgeon", None, [m["a"], m["b_plus"], "-a", "mean"]),
}


def _start(kind, recipe, args, out, tmp, disabled: bool) -> subprocess.Popen:
    # MergeKit lists models in set order, so its card depends on the hash seed: fix it.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONHASHSEED": "0",
           **({"MERGEKIT_PERMUTE_DISABLE": "1"} if disabled else {})}
    if kind == "yaml":
        path = tmp / f"recipe-{'stock' if disabled else 'plugin'}.yml"
        path.write_text(yaml.safe_dump(recipe))
        command = [cli("mergekit-yaml"), str(path), str(out), *args]
    else:
        command = [cli("mergekit-tokensurgeon"), *args, str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_stock_mergekit_is_bit_identical_with_the_plugin(models, tmp_path, scenario):
    kind, recipe, args = SCENARIOS[scenario](models)
    digests = {}
    # both runs side by side (separate processes and outputs; CI's two cores)
    runs = {disabled: _start(kind, recipe, args, tmp_path / ("stock" if disabled else "plugin"),
                             tmp_path, disabled) for disabled in (True, False)}
    for disabled, proc in runs.items():
        _, stderr = proc.communicate()
        out = tmp_path / ("stock" if disabled else "plugin")
        assert proc.returncode == 0, (disabled, stderr[-3000:])
        assert "mergekit-permute: could not hook" not in stderr
        digests[disabled] = _digest(out)
        if not disabled:
            assert (out / "config.json").is_file()
    # Same files, same bytes. The card names its directory, and MergeKit lists the models in
    # set order (object hashes, so it varies from process to process): compare its lines.
    stock, plugin = tmp_path / "stock", tmp_path / "plugin"
    if (stock / "README.md").exists():
        text = (stock / "README.md").read_text().replace("# stock\n", "# plugin\n")
        assert sorted(text.splitlines()) == sorted((plugin / "README.md").read_text().splitlines())
        for d in digests.values():
            d.pop("README.md")
    assert digests[False] == digests[True]


def test_the_plugin_adds_nothing_to_mergekit_but_permute_and_bertforpretraining():
    """The method list gains `permute`; the architecture table gains only what MergeKit lacks;
    importing MergeKit's methods loads none of our alignment stack (no scipy)."""
    probe = (
        "import sys, json\n"
        "import mergekit.merge_methods as mm\n"
        "from mergekit.architecture.json_definitions import NAME_TO_ARCH\n"
        "print(json.dumps({'methods': sorted(m.spec.name for m in mm.registered_methods()),"
        " 'archs': sorted(NAME_TO_ARCH), 'ids': {k: id(v) for k, v in NAME_TO_ARCH.items()},"
        " 'heavy': sorted(m for m in ('scipy', 'scipy.optimize', 'mergekit_permute.align.pipeline',"
        " 'mergekit_permute.core.match', 'mergekit_permute.calibration.blocks') if m in sys.modules)}))\n")
    import json
    procs = {disabled: subprocess.Popen(
        [sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **({"MERGEKIT_PERMUTE_DISABLE": "1"} if disabled else {})})
        for disabled in (True, False)}   # side by side
    runs = {}
    for disabled, proc in procs.items():
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-2000:]
        runs[disabled] = json.loads(stdout.strip().splitlines()[-1])
    assert set(runs[False]["methods"]) - set(runs[True]["methods"]) == {"permute"}
    assert set(runs[False]["archs"]) - set(runs[True]["archs"]) == {"BertForPreTraining"}
    assert runs[False]["heavy"] == runs[True]["heavy"]   # (MergeKit itself may load scipy)
    assert not any(m.startswith("mergekit_permute.") for m in runs[False]["heavy"])


def test_permute_on_bare_tensors_says_it_needs_model_paths():
    import mergekit.merge_methods as mm

    from mergekit_permute.settings import RecipeError
    tensors = [torch.randn(4, 6) for _ in range(3)]
    with pytest.raises(RecipeError, match="needs model paths, not bare tensors"):
        mm.merge_state_dicts([{"w": t} for t in tensors], "permute", base=0)


def test_a_broken_hook_is_reported_clearly_and_leaves_mergekit_working(tmp_path):
    """If a MergeKit change breaks our hook, MergeKit still works and the message says what
    is lost and how to silence it."""
    sitecustom = tmp_path / "sitecustomize.py"
    sitecustom.write_text("import mergekit_permute.mergekit.hooks as h\n"
                          "def boom():\n    raise AttributeError('MergePlanner has no plan_tensor')\n"
                          "h.hook_planner = boom\n")
    r = subprocess.run([sys.executable, "-c", "import mergekit.plan; import mergekit.merge_methods"
                        " as mm; print(len(mm.registered_methods()))"], capture_output=True,
                       text=True, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "could not hook into MergeKit" in r.stderr and "MERGEKIT_PERMUTE_DISABLE=1" in r.stderr
    assert int(r.stdout.strip()) > 10
    shutil.rmtree(tmp_path, ignore_errors=True)
