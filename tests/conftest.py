import os
import subprocess
import sys
from pathlib import Path

# Before anything imports tqdm or transformers: both read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from mergekit_permute.zoo import ZooConfig, train_pair  # noqa: E402

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512, seq_len=32,
            batch=32, steps=100)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats-cache")
    os.environ["MERGEKIT_PERMUTE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Two tiny trained models per architecture, trained once per test session."""
    # MERGEKIT_PERMUTE_TEST_ZOO: a directory kept between sessions (trained models are reused).
    keep = os.environ.get("MERGEKIT_PERMUTE_TEST_ZOO")
    root = Path(keep) if keep else tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = [str(p) for p in train_pair(ZooConfig(arch=arch, **TINY), (1, 2), root)]
        return cache[arch]
    return get


@pytest.fixture
def no_forward(monkeypatch):
    """Fails a test whose command runs a forward pass (errors must come before any work)."""
    from mergekit_permute.calibration.blocks import BlockModel

    def refuse(*args, **kwargs):
        raise AssertionError("a forward pass ran before the error")
    monkeypatch.setattr(BlockModel, "catch", refuse)


@pytest.fixture
def pair(zoo, tmp_path):
    """Copies of the llama pair (so a failure could only harm copies)."""
    import shutil
    a, b = zoo("llama")
    shutil.copytree(a, tmp_path / "A")
    shutil.copytree(b, tmp_path / "B")
    return str(tmp_path / "A"), str(tmp_path / "B")


def run_cli(*args, cwd=None, env=None):
    """Run a console command the way a user does; returns CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env)


def cli(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def third_model(src: str, out: Path, noise: float, permute_seed=None) -> str:
    """A third "seed" for N-model tests: a copy of a zoo model, optionally randomly permuted
    (function kept), with its weights nudged; saved with the source's tokenizer."""
    import shutil

    import torch
    import transformers as T

    from mergekit_permute.core.permute import apply_to_model, random_transforms
    from mergekit_permute.spec import spec_for_config
    model = T.AutoModelForCausalLM.from_pretrained(src)
    if permute_seed is not None:
        spec = spec_for_config(model.config)
        apply_to_model(spec, model, random_transforms(spec, seed=permute_seed, qk_follows_vo=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", out / f)
    return str(out)


class Result:
    """What a command run in-process returned (the shape of a CompletedProcess)."""

    def __init__(self, r):
        self.returncode = r.exit_code
        self.stdout = r.stdout
        self.stderr = r.stderr + (repr(r.exception) if r.exception and r.exit_code not in (0, 2)
                                  else "")


def invoke(command: str, *args) -> Result:
    """A console command run in-process (click's CliRunner): `mergekit-permute` or
    `mergekit-yaml`. Subprocesses are kept for what needs a process boundary."""
    from click.testing import CliRunner
    if command == "mergekit-yaml":
        from mergekit.scripts.run_yaml import main as entry
    else:
        from mergekit_permute.cli import main as entry
    return Result(CliRunner().invoke(entry, [str(a) for a in args]))
