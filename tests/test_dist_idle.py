"""torch.distributed with ranks that see no tokens (fewer batches than ranks): they all-reduce
zero sums of the right shapes, and the shifted sums of the ranks that did see tokens combine
exactly (every rank re-centres onto the first such rank's shifts)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mergekit_permute.calibration.stats import CrossStats
from tests.conftest import invoke


def _features(seed, tokens, d, offset):
    gen = torch.Generator().manual_seed(seed)
    a = (1e4 + offset + torch.randn(tokens, d, generator=gen)).float()
    b = (a[:, torch.randperm(d, generator=gen)] + 0.2 * torch.randn(tokens, d, generator=gen))
    return a, b.float()


# key -> what rank 0 and rank 1 see: (seed, tokens, offset) or None (no tokens at all)
PARTS = {"both@0": ((1, 300, 0.0), (2, 200, 4.0)),
         "first@0": ((3, 250, 0.0), None),
         "second@0": (None, (4, 250, -7.0))}


def _rank_stats(rank, d=12):
    stats = {}
    for key, parts in PARTS.items():
        s = CrossStats.zeros(d, d)
        if parts[rank] is not None:
            a, b = _features(*parts[rank][:2], d, parts[rank][2])
            for i in range(0, a.shape[0], 64):
                s.update(a[i:i + 64], b[i:i + 64])
        stats[key] = s
    return stats


def _reduce_worker(rank, init, out):
    import torch.distributed as td

    from mergekit_permute.calibration.dist import Distributed
    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        reduced = Distributed().reduce(_rank_stats(rank))
        torch.save({k: s.tensors() for k, s in reduced.items()}, f"{out}/rank{rank}.pt")
    finally:
        td.destroy_process_group()


def test_all_reduce_with_an_idle_rank_equals_one_process(tmp_path):
    mp.spawn(_reduce_worker, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2,
             join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key in PARTS:   # every rank holds the same sums, about the same shifts
        assert all(torch.equal(got[0][key][n], got[1][key][n]) for n in got[0][key]), key
    ranks = [_rank_stats(0), _rank_stats(1)]
    for key, parts in PARTS.items():
        reduced = CrossStats.from_tensors(got[0][key])
        # the shifts of the first rank that saw tokens
        owner = ranks[0][key] if parts[0] is not None else ranks[1][key]
        assert torch.equal(reduced.shift_a, owner.shift_a), key
        one = ranks[0][key] + ranks[1][key]          # one process, both parts
        seen = [_features(*p[:2], 12, p[2]) for p in parts if p is not None]
        a, b = torch.cat([x for x, _ in seen]), torch.cat([y for _, y in seen])
        assert float(reduced.n) == a.shape[0]
        torch.testing.assert_close(reduced.correlation(), one.correlation(), rtol=0, atol=1e-12)
        torch.testing.assert_close(reduced.raw_sum_ab(), a.double().T @ b.double(), rtol=1e-12,
                                   atol=0)
        ref = torch.corrcoef(torch.cat([a, b], 1).T.double())[:12, 12:]
        torch.testing.assert_close(reduced.correlation(), ref, rtol=0, atol=2e-6)


def test_two_ranks_with_one_batch_give_the_permutations_of_one_process(zoo, tmp_path):
    """`torchrun --nproc-per-node 2` over a single calibration batch: rank 1 calibrates
    nothing, contributes zero sums, and rank 0's permutations are the single process's."""
    a, b = zoo("llama")
    args = ["--data", "shakespeare-calib", "--samples", "16", "--batch-size", "16",
            "--max-length", "32", "--residual", "all", "--cache", "off", "--permutations-only"]
    one = tmp_path / "one"
    r = invoke("mergekit-permute", "align", a, b, *args, "--out", one)
    assert r.returncode == 0, r.stdout + r.stderr
    two = tmp_path / "two"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m",
                        "mergekit_permute", "align", a, b, *args, "--out", str(two)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    p1, p2 = load_file(one / "permutations.safetensors"), load_file(two / "permutations.safetensors")
    assert p1.keys() == p2.keys()
    for key in p1:
        assert torch.equal(p1[key], p2[key]), key
    docs = [json.loads((d / "alignment.json").read_text()) for d in (one, two)]
    assert docs[0]["data"]["tokens"] == docs[1]["data"]["tokens"] > 0


RANK_CACHE = """
import os, sys
os.environ["MERGEKIT_PERMUTE_CACHE"] = sys.argv.pop(1) + os.environ["LOCAL_RANK"]
from mergekit_permute.cli import main
sys.argv[0] = "mergekit-permute"
main()
"""


def test_ranks_whose_node_local_caches_differ_all_calibrate(zoo, tmp_path):
    """Two nodes with their own statistics caches, only the first holding this run's entry:
    no rank reads it (one that did would skip the all-reduces the others wait in), and the
    result is the single process's."""
    a, b = zoo("llama")
    args = ["--data", "shakespeare-calib", "--samples", "32", "--batch-size", "16",
            "--max-length", "32", "--residual", "all", "--permutations-only"]
    caches = tmp_path / "cache-rank"
    env = {**__import__("os").environ, "MERGEKIT_PERMUTE_CACHE": f"{caches}0"}
    r = subprocess.run([sys.executable, "-m", "mergekit_permute", "align", a, b, *args,
                        "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(Path(f"{caches}0").glob("stats-*")) and not Path(f"{caches}1").exists()
    script = tmp_path / "rank_cache.py"
    script.write_text(RANK_CACHE)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(caches),
                        "align", a, b, *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    p1, p2 = (load_file(tmp_path / d / "permutations.safetensors") for d in ("one", "two"))
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k], p2[k]) for k in p1)
