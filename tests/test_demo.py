import json

from tests.conftest import invoke


def test_demo_runs_end_to_end_in_quick_mode(tmp_path):
    out = tmp_path / "demo"
    r = invoke("mergekit-permute", "demo", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| vanilla |" in r.stdout and "| default |" in r.stdout
    doc = json.loads((out / "barrier.json").read_text())
    assert doc["methods"]["default"]["barrier"] < doc["methods"]["vanilla"]["barrier"]
    for f in ("barrier.png", "barrier.md", "recipe.yml", "merged/model.safetensors",
              "merged/config.json", "merged/tokenizer.json"):
        assert (out / f).is_file(), f
    card = (out / "merged" / "README.md").read_text()
    assert "Loss barrier" in card and "| default |" in card
    # A second run reuses the trained models and refuses to clobber the merge.
    r2 = invoke("mergekit-permute", "demo", "--quick", "--out", str(out))
    assert r2.returncode == 2 and "--overwrite" in r2.stderr


def test_training_is_deterministic_for_a_seed(tmp_path):
    import torch
    from safetensors.torch import load_file

    from mergekit_permute.zoo import ZooConfig, train
    cfg = ZooConfig(arch="llama", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                    vocab=256, seq_len=16, batch=8, steps=5, train_passages=200)
    runs = [load_file(str(train(cfg, 7, tmp_path / f"r{i}") / "model.safetensors")) for i in (0, 1)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = load_file(str(train(cfg, 8, tmp_path / "r2") / "model.safetensors"))
    assert not all(torch.equal(runs[0][k], other[k]) for k in runs[0])
