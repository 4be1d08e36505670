import json

from tests.conftest import cli, run_cli


def test_demo_runs_end_to_end_in_quick_mode(tmp_path):
    out = tmp_path / "demo"
    r = run_cli(cli("mergekit-permute"), "demo", "--quick", "--out", str(out))
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
    r2 = run_cli(cli("mergekit-permute"), "demo", "--quick", "--out", str(out))
    assert r2.returncode == 2 and "--overwrite" in r2.stderr
