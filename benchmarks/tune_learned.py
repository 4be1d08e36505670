"""Tuning `matching: learned` on the TUNING zoo only (issue 22): Shakespeare Llama-GQA seeds of
benchmarks/zoo.py (cpu size), disjoint pairs 1-2 and 3-4. Every candidate setting is a
`barrier --methods` name, measured in the same run as vanilla and the default on the same text;
the settings chosen here are then reported, unchanged, on the evaluation zoos
(benchmarks/eval_quality.py), which are never used to choose anything.

    python benchmarks/tune_learned.py [--pairs 1-2,3-4] [--threads 1] [--text calib|train]
                                      [--one-change]

Output: benchmarks/results/tune/llama-<a>-<b>[-train-text].json (resumable per method: methods already in a
pair's file are skipped, new ones measured and merged in).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

OUT = HERE / "results" / "tune"
LEARNED = "default+matching=learned"
# (measured before learn_samples: each learned candidate's loss on the 512 calibration passages)
BEFORE = "+learn_samples=512"
# (measured before learn_plateau, and stopped at a plateau: named as they ran)
STOP = "+learn_plateau=stop"
CANDIDATES = [
    "vanilla", "default",
    f"{LEARNED}+learn_lr=0.01+learn_steps=300{BEFORE}",                          # before
    f"{LEARNED}+learn_lr=0.01+learn_steps=300+learn_lambdas=0.4-0.6{BEFORE}",
    f"{LEARNED}+learn_lr=0.003+learn_steps=600{STOP}{BEFORE}",
    f"{LEARNED}+learn_lr=0.003+learn_steps=600+learn_lambdas=0.4-0.6{STOP}{BEFORE}",
    f"{LEARNED}+learn_lr=0.003+learn_steps=600+learn_lambdas=0.4-0.6+learn_init=best{STOP}{BEFORE}",
    # FF permutations learned too: straight-through estimator against Sinkhorn (issue 22)
    f"{LEARNED}+learn_steps=300+learn_permutations=true{BEFORE}",
    f"{LEARNED}+learn_steps=300+learn_permutations=true+learn_estimator=sinkhorn{STOP}{BEFORE}",
]
# More text for the learned loss (`learn_samples`; its passages shuffled with a fixed seed), on
# the tuning zoo's training text (5557 passages; the calibration file holds 693): 512 (the
# calibration's), 2048 and 4096 at the then-default 300 steps; with 2048, 600 steps at the
# default rate (the candidate that became the default) and the schedule candidate at 600 and
# 1200 steps.
SCHEDULE = "learn_lr=0.003+learn_steps=600+learn_lambdas=0.4-0.6+learn_init=best"
LONG_SCHEDULE = SCHEDULE.replace("learn_steps=600", "learn_steps=1200")
TEXT_CANDIDATES = ["vanilla", "default"] + [
    f"{LEARNED}+learn_steps=300+learn_samples={n}" for n in (512, 2048, 4096)] + [
    f"{LEARNED}+learn_samples=2048",
    f"{LEARNED}+{SCHEDULE}+learn_samples=2048", f"{LEARNED}+{LONG_SCHEDULE}+learn_samples=2048"]
# One change at a time from the default (600 steps, 2048 passages), on both disjoint pairs:
# lambda sampled from [0.4, 0.6], the better of activation and weight matching as the start,
# the FF permutations or the head permutations learned too (straight-through against Sinkhorn;
# issue 22, item 3), and twice the steps.
ONE_CHANGE = ["learn_lambdas=0.4-0.6", "learn_init=best", "learn_permutations=true",
              "learn_permutations=true+learn_estimator=sinkhorn", "learn_steps=1200",
              "learn_heads=true", "learn_heads=true+learn_estimator=sinkhorn"]
# The default measured again under a name its earlier measurement does not hold (the same
# settings): a candidate is compared with the default of its own run (report_learned.py), and
# the zoo is retrained on every new machine, where training rounds differently.
RERUN = f"{LEARNED}+learn_heads=false+learn_samples=2048"
ONE_CHANGE_METHODS = ["vanilla", "default", f"{LEARNED}+learn_samples=2048"] + [
    f"{LEARNED}+{change}+learn_samples=2048" for change in ONE_CHANGE] + [RERUN]
TEXT_CANDIDATES += ONE_CHANGE_METHODS[3:]
# All of the training text (5557 passages) against 2048 at 600 and 1200 steps, on both pairs:
# do the maps overfit their 2048 passages (the anchor's 1200-step runs did worse on one pair)?
ALL_TEXT = [f"{LEARNED}+learn_samples=5557", f"{LEARNED}+learn_steps=1200+learn_samples=5557"]
# ... and their 2048-passage references measured again under names with the same settings
# (learn_init=activations is the default), with the code of that run
ALL_TEXT += [f"{LEARNED}+learn_init=activations+learn_samples=2048",
             f"{LEARNED}+learn_steps=1200+learn_init=activations+learn_samples=2048"]
TEXT_CANDIDATES += ALL_TEXT
TEXTS = {"calib": ("shakespeare-calib", "", CANDIDATES),
         "train": ("shakespeare-train", "-train-text", TEXT_CANDIDATES)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="1-2,3-4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", choices=sorted(TEXTS), default="calib",
                    help="calibration text: calib (693 passages) or train (the zoo's training "
                         "text, 5557 passages, for the learn_samples candidates)")
    ap.add_argument("--methods", default=None, help="default: the candidates of --text")
    ap.add_argument("--one-change", action="store_true",
                    help="only vanilla, the default, the learned default and ONE_CHANGE's "
                         "candidates and ALL_TEXT's (what pair 3-4 measured)")
    args = ap.parse_args()
    calibration, suffix, candidates = TEXTS[args.text]
    methods = (args.methods.split(",") if args.methods
               else ONE_CHANGE_METHODS + ALL_TEXT if args.one_change else candidates)
    import torch

    from benchmarks.zoo import zoo
    from mergekit_permute.barrier import run_barrier
    from mergekit_permute.evaluate import Evaluation
    from mergekit_permute.settings import AlignSettings, RunSettings
    torch.set_num_threads(args.threads)
    pairs = [tuple(int(x) for x in p.split("-")) for p in args.pairs.split(",")]
    _, paths = zoo("llama", max(max(p) for p in pairs), "cpu")
    OUT.mkdir(parents=True, exist_ok=True)
    for a, b in pairs:
        out = OUT / f"llama-{a}-{b}{suffix}.json"
        old = json.loads(out.read_text()) if out.is_file() else None
        todo = [m for m in methods if not old or m not in old["methods"]]
        if not todo:
            continue
        run = time.strftime("%Y-%m-%dT%H:%M:%S")
        again = old is not None and "vanilla" not in todo   # the zoo still the stored one?
        result = run_barrier(paths[a - 1], paths[b - 1],
                             methods=todo + (["vanilla"] if again else []),
                             settings=AlignSettings(samples=512, max_length=64, batch_size=16),
                             evaluation=Evaluation("shakespeare-eval", 256, 64, lambdas=11),
                             calibration=calibration, run=RunSettings(cache="refresh"))
        for m in todo:   # which run measured it: candidates are compared within one run
            result["methods"][m]["run"] = run
        result.update(arch="llama", seeds=[a, b], zoo="benchmarks/zoo.py --size cpu (Shakespeare)",
                      text=calibration)
        if old:   # methods measured in earlier runs kept; the share removed against one vanilla
            added = {"run": run, "methods": todo, "command": " ".join(sys.argv),
                     "calibration_seconds": result.get("calibration_seconds")}
            result.update({k: v for k, v in old.items() if k not in ("methods", "added")})
            if again:
                added["vanilla_minus_stored"] = (result["methods"].pop("vanilla")["barrier"]
                                                 - old["methods"]["vanilla"]["barrier"])
            result["added"] = old.get("added", []) + [added]
            result["methods"] = dict(old["methods"], **result["methods"])
            vanilla = result["methods"]["vanilla"]["barrier"]
            for m in result["methods"].values():
                m["removed_vs_vanilla"] = 1 - m["barrier"] / vanilla
        tmp = out.with_suffix(".partial")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)
        print(a, b, {m: (round(v["barrier"], 4), v.get("alignment_seconds"))
                     for m, v in result["methods"].items()}, flush=True)


if __name__ == "__main__":
    main()
