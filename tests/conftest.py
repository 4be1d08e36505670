import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_permute.zoo import ZooConfig, train_pair

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512, seq_len=32,
            batch=32, steps=100)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats-cache")
    os.environ["MERGEKIT_PERMUTE_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Two tiny trained models per architecture, trained once per test session."""
    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = [str(p) for p in train_pair(ZooConfig(arch=arch, **TINY), (1, 2), root)]
        return cache[arch]
    return get


def run_cli(*args, cwd=None, env=None):
    """Run a console command the way a user does; returns CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env)


def cli(name: str) -> str:
    return str(Path(sys.executable).parent / name)
