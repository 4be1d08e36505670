"""Atomic outputs, cached statistics, bit-identical reruns, nothing written outside --out."""

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time

from tests.conftest import cli, invoke, run_cli

ARGS = ["--data", "shakespeare-calib", "--samples", "120", "--max-length", "32"]

# Run `align`, but stall inside the output directory write so the test can kill it there.
STALLING_ALIGN = """
import sys, time
import mergekit_permute.core.alignment as align
real = align.save_alignment
def stall(alignment, out_dir):
    real(alignment, out_dir)
    print("WRITING", flush=True)
    time.sleep(120)
align.save_alignment = stall
import mergekit_permute.cli as cli
sys.argv = ["mergekit-permute"] + sys.argv[1:]
cli.main()
"""


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_run_leaves_no_finished_looking_directory(zoo, tmp_path):
    a, b = zoo("llama")
    out = tmp_path / "aligned"
    proc = subprocess.Popen([sys.executable, "-c", STALLING_ALIGN, "align", a, b, *ARGS,
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    deadline, seen = time.time() + 300, ""
    while time.time() < deadline and "WRITING" not in seen:
        if proc.poll() is not None:  # the child died: fail now, with its exit status
            raise AssertionError(f"align exited with {proc.returncode} before writing")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            seen += proc.stdout.readline()
    assert "WRITING" in seen, "align never reached the output write"
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".aligned.partial-")]
    assert partial and (partial[0] / "model.safetensors").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # The rerun reuses the statistics the killed run cached, and completes.
    r = run_cli(cli("mergekit-permute"), "-v", "align", a, b, *ARGS, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing cached calibration statistics" in r.stderr
    assert (out / "model.safetensors").exists()


def test_changed_input_invalidates_the_cache(zoo, tmp_path, caplog):
    a, b = zoo("llama")
    caplog.set_level("INFO")

    def align(samples: str, out: str):
        caplog.clear()
        r = invoke("mergekit-permute", "align", a, b, "--data", "shakespeare-calib",
                   "--samples", samples, "--max-length", "32", "--out", tmp_path / out)
        assert r.returncode == 0, r.stderr
        return caplog.text
    assert "reusing" not in align("121", "o1")
    assert "reusing cached calibration statistics" in align("121", "o2")
    assert "reusing" not in align("122", "o3")


def test_same_inputs_give_bit_identical_outputs(zoo, tmp_path):
    a, b = zoo("bert")
    # Different hash seeds: anything written in dict/set order of strings must still agree.
    for run, hash_seed in (("r1", "1"), ("r2", "2")):
        r = run_cli(cli("mergekit-permute"), "align", a, b, *ARGS, "--no-cache",
                    "--out", str(tmp_path / run), env={"PYTHONHASHSEED": hash_seed})
        assert r.returncode == 0, r.stderr[-2000:]
    for f in ("model.safetensors", "permutations.safetensors", "config.json"):
        assert _sha(tmp_path / "r1" / f) == _sha(tmp_path / "r2" / f), f
    # alignment.json: identical but for its wall-clock timings.
    docs = [json.loads((tmp_path / r / "alignment.json").read_text()) for r in ("r1", "r2")]
    for doc in docs:
        assert doc.pop("timings")["total_seconds"] > 0
    assert docs[0] == docs[1]


def test_nothing_is_written_outside_out_and_cache(zoo, tmp_path):
    a, b = zoo("bert")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, HOME=str(tmp_path / "home"), MERGEKIT_PERMUTE_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "home" / "hf"))
    r = subprocess.run([cli("mergekit-permute"), "align", a, b, *ARGS, "--out", "aligned"],
                       cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["aligned"]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "cache" in written
    home = tmp_path / "home"
    assert not home.exists() or not [p for p in home.rglob("*") if p.is_file()]
