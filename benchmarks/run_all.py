"""One command: seed zoo -> quality benchmark -> performance benchmark -> BENCHMARKS.md.

    python benchmarks/run_all.py            # CPU sizes (~1 hour on 2 cores, zoo cached)
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for step in (["zoo.py", "--seeds", "4"], ["quality.py", "--seeds", "4"], ["perf.py"], ["report.py"]):
    subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]], check=True, cwd=HERE.parent,
                   env={**__import__("os").environ, "PYTHONPATH": str(HERE.parent)})
