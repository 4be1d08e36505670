"""One command: seed zoo -> quality (paper's ablations) -> beyond the paper -> N-model merges
-> performance -> BENCHMARKS.md.

    python benchmarks/run_all.py            # CPU sizes (a few hours on 2 cores, zoo cached)
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

STEPS = (["zoo.py", "--seeds", "4", "--arch", "bert"], ["zoo.py", "--seeds", "4", "--arch", "llama"],
         ["zoo.py", "--seeds", "3", "--arch", "neox"], ["quality.py", "--seeds", "4"],
         ["beyond.py", "--seeds", "4", "--arch", "bert"],
         ["beyond.py", "--seeds", "4", "--arch", "llama"],
         ["beyond.py", "--seeds", "3", "--arch", "neox"], ["multi.py", "--seeds", "4"],
         ["perf.py"], ["report.py"])
for step in STEPS:
    subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]], check=True, cwd=HERE.parent,
                   env={**__import__("os").environ, "PYTHONPATH": str(HERE.parent)})
