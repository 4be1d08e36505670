"""One command: realistic zoo -> its quality benchmark -> scale -> MergeKit's own suite ->
BENCHMARKS.md -> README blocks. The first round's small-zoo ablations (quality.py, beyond.py,
multi.py on zoo.py) are separate: `python benchmarks/run_all.py --small-zoo` adds them;
`--learned-zoos` adds issue 22's zoos (tuning candidates, evaluation zoos, the GPT-2 anchor),
each trained and measured as its script's docstring says: about a day on 2 cores.

    python benchmarks/run_all.py            # CPU: a few hours on 2 cores (zoo cached)
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

STEPS = [["realistic_zoo.py", "--arch", "all", "--seeds", "4"],
         *[["realistic_quality.py", "--arch", arch, "--pairs", pairs] for arch, pairs in
           (("llama", "1-2,3-4,1-3,2-4"), ("neox", "1-2,3-4,1-3,2-4"), ("bert", "1-2,3-4"))],
         *[["scale.py", "--shape", shape, "--layers", *layers, "--repeats", "1", "--no-cached"]
           for shape, layers in (("tinyllama", ["4", "8", "22"]), ("bert-base", ["12"]),
                                 ("pythia-410m", ["24"]))],
         ["../scripts/mergekit_suite.py"]]
SMALL_ZOO = [["zoo.py", "--seeds", "4", "--arch", "bert"], ["zoo.py", "--seeds", "4", "--arch", "llama"],
             ["zoo.py", "--seeds", "3", "--arch", "neox"], ["quality.py", "--seeds", "4"],
             ["beyond.py", "--seeds", "4", "--arch", "bert"],
             ["beyond.py", "--seeds", "4", "--arch", "llama"],
             ["beyond.py", "--seeds", "3", "--arch", "neox"], ["multi.py", "--seeds", "4"]]
LEARNED_ZOOS = [["zoo.py", "--seeds", "4", "--arch", "llama"], ["tune_learned.py"],
                ["tune_learned.py", "--text", "train", "--pairs", "1-2"],
                ["tune_learned.py", "--text", "train", "--pairs", "3-4", "--one-change"],
                ["eval_zoo.py", "--arch", "llama"], ["eval_zoo.py", "--arch", "neox"],
                ["eval_zoo.py", "--arch", "bert"],
                ["eval_zoo.py", "--arch", "llama6x384"],
                ["eval_quality.py", "--arch", "llama"], ["eval_quality.py", "--arch", "neox"],
                ["eval_quality.py", "--arch", "bert"],
                ["eval_quality.py", "--arch", "llama6x384"],
                ["anchor_zoo.py"], ["anchor_quality.py"],
                ["anchor_zoo.py", "--corpus", "sotu"],
                ["anchor_quality.py", "--corpus", "sotu"]]
FINISH = [["report.py"], ["../scripts/update_readme.py", "--skip-demo"]]

steps = STEPS + (SMALL_ZOO if "--small-zoo" in sys.argv else []) + \
    (LEARNED_ZOOS if "--learned-zoos" in sys.argv else []) + FINISH
for step in steps:
    subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]], check=True, cwd=HERE.parent,
                   env={**os.environ, "PYTHONPATH": str(HERE.parent)})
