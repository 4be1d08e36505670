"""Learned alignment's time on one evaluation pair, for issue 22's default criterion (at most 5
minutes per 4-layer/256 pair on 2 CPU cores): `default+matching=learned` on the SOTU Llama pair
1-2, measured by eval_quality.run_pair into a scratch folder (the stored results stay as they
are), with `--threads` torch threads. Run it on a quiet machine.

    python benchmarks/learned_timing.py --threads 2 [--arch llama] [--pair 1-2]

Adds a row to benchmarks/results/learned-timing-cpu.json.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import eval_quality as eq  # noqa: E402
from scale import cpu_model  # noqa: E402

METHOD = "default+matching=learned"
RESULTS = HERE / "results" / "learned-timing-cpu.json"


def _commit() -> str:
    """The checkout's commit (with `+` when it has uncommitted changes)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout
    return git("rev-parse", "--short", "HEAD").strip() + ("+" if git("status", "--porcelain",
                                                                     "mergekit_permute") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--pair", default="1-2")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    args = ap.parse_args()
    a, b = (int(x) for x in args.pair.split("-"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        doc = json.loads(eq.run_pair(args.arch, a, b, [METHOD], args.threads,
                                     out_dir=Path(tmp)).read_text())
        wall = time.perf_counter() - start
    m = doc["methods"][METHOD]
    row = {"arch": args.arch, "pair": args.pair, "threads": args.threads,
           "cpus": os.cpu_count(), "calibration_seconds": doc["calibration_seconds"],
           "alignment_seconds": m["alignment_seconds"],
           "calibration_plus_alignment": round(doc["calibration_seconds"]
                                               + m["alignment_seconds"], 2),
           "wall_seconds_with_barrier": round(wall, 1),
           "learn_steps": m["settings"]["learn_steps"], "steps_run": m["learned"]["steps_run"],
           "barrier": m["barrier"], "date": datetime.date.today().isoformat(),
           "cpu": cpu_model(), "code": _commit(), "note": args.note}
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    old["runs"].append(row)
    RESULTS.write_text(json.dumps(old, indent=1) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
