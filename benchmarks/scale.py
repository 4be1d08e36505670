"""Scale benchmark: memory flat in depth, time against the floor, solving on every core.
Random-init Llama pairs (bf16 safetensors) of a `--shape`: `toy` (hidden 512, FF 1408, 8 query /
2 KV heads; the CPU smoke), `tinyllama` (2048 / 5632, 32 / 4 heads) or `llama7b` (4096 / 11008,
32 / 32 heads), at `--layers` depths; 64 passages x 64 tokens. `--learned STEPS` also times
`matching: learned`; on a GPU (`--device cuda`) the peak GPU memory is recorded too.

Every measurement runs in its own process, which reports its own peak RSS, so the numbers are
not polluted by each other; floor and align alternate `--repeats` times per depth (median
time, highest peak), since a shared machine's speed drifts by 10-30% between runs:
  floor   load both models (fp32) and run their bare forwards over the same batches;
  align   `mergekit-permute align --cache off` (calibration, solving, writing aligned B): the
          same work as the floor plus alignment, nothing else written;
  cached  `mergekit-permute align --no-cache`: the default path of a first run, which also
          hashes both checkpoints and writes every layer's statistics to the cache;
  solve   solving alone: eight 3072-wide FF-like spaces, 1 worker vs every core.
Peak memory is reported above the import baseline (a process that imports the same modules)
and as a multiple of one bf16 checkpoint.

    python benchmarks/scale.py [--layers 8 16 32] [--device cpu] [--shape toy]
    # one H100, a few minutes: the 1.1B pair (default and learned), then the 7B-class pair
    python benchmarks/scale.py --device cuda --shape tinyllama --layers 22 --repeats 1 \
        --learned 50 --no-cached --no-solve
    python benchmarks/scale.py --device cuda --shape llama7b --layers 32 --repeats 1 \
        --no-cached --no-solve
Results: benchmarks/results/scale-DEVICE[-SHAPE].json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Llama shapes: `toy` is the quick CI-sized one; the others are what users run.
SHAPES = {
    "toy": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
}
CALIB = ["--data", "shakespeare-calib", "--samples", "64", "--max-length", "64",
         "--batch-size", "8"]

PROBE = """
import resource, sys, time, json
mode, args = sys.argv[1], sys.argv[2:]
import torch, transformers, mergekit_permute.cli  # the same imports in every mode
from transformers.models.llama import modeling_llama  # noqa: F401  (the model code itself)
from transformers import PreTrainedTokenizerFast  # noqa: F401
start = time.perf_counter()
if mode == "floor":
    from mergekit_permute.io.batches import tokenize
    from mergekit_permute.io.data import load_texts
    a, b, device = args
    tok = transformers.AutoTokenizer.from_pretrained(a)
    tok.pad_token = tok.pad_token or tok.eos_token
    # forwards in align's compute dtype: the checkpoint's (bf16) on a GPU, float32 on the CPU
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    models = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device)
              for p in (a, b)]
    batches = tokenize(tok, load_texts("shakespeare-calib", 64), 64, 8)
    with torch.no_grad():
        for m in models:
            for batch in batches:
                m(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
elif mode == "cli":
    sys.argv = ["mergekit-permute", *args]
    try:
        mergekit_permute.cli.main()
    except SystemExit as e:
        assert not e.code, e.code
seconds = time.perf_counter() - start
gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
print(json.dumps({"seconds": seconds, "peak_gpu_mib": gpu,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def probe(mode: str, *args: str, env=None) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, mode, *args], capture_output=True,
                       text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_pair(root: Path, layers: int, shape: str = "toy", device: str = "cpu"):
    """A random-init bf16 pair of the shape (built on `device`: a GPU builds a 7B pair in
    seconds), with a tokenizer trained on the shipped text."""
    import torch
    import transformers as T

    from mergekit_permute.io.data import load_texts
    from mergekit_permute.zoo import build_tokenizer
    dims = SHAPES[shape]
    tok = build_tokenizer(min(dims["vocab_size"], 8192), "llama",
                          load_texts("shakespeare-train", 4000))
    paths = []
    for seed in (0, 1):
        path = root / f"{shape}-{layers}-{seed}"
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            config = T.LlamaConfig(num_hidden_layers=layers, pad_token_id=0, bos_token_id=2,
                                   eos_token_id=3, tie_word_embeddings=False, **dims)
            config.architectures = ["LlamaForCausalLM"]
            with torch.device(device):
                model = T.LlamaForCausalLM(config).to(torch.bfloat16)
            model.save_pretrained(path)
            del model
            tok.save_pretrained(path)
        paths.append(str(path))
    return paths


def solve_benchmark(width: int = 3072, spaces: int = 16) -> dict:
    """Solving alone: `spaces` FF-like spaces of `width` features, by 1 worker and by every
    core (the pool path real models take)."""
    import torch

    from mergekit_permute.settings import AlignSettings
    from mergekit_permute.align.solve import Solver
    from mergekit_permute.spec.base import PermutationSpec, Space, WeightRule, Bind
    from mergekit_permute.calibration.stats import CrossStats
    names = [f"ffn.{i}" for i in range(spaces)]
    spec = PermutationSpec(family="bench", architecture="Bench", num_layers=spaces, blocks="h",
                           spaces=tuple(Space(name=n, kind="ffn", size=width, layer=i)
                                        for i, n in enumerate(names)),
                           weights=tuple(WeightRule(name=f"h.{i}.w", shape=(width,), layer=i,
                                                    axes=(Bind(space=n, role="out"),))
                                         for i, n in enumerate(names)))
    gen = torch.Generator().manual_seed(0)
    stats = {}
    for n in names:
        s = CrossStats.zeros(width, width)
        # independent features: an assignment as hard as on random-init models' FF spaces
        a = torch.randn(4 * width, width, generator=gen)
        s.update(a, torch.randn(4 * width, width, generator=gen))
        stats[f"{n}@0"] = s
    out = {}
    for workers in (1, os.cpu_count() or 1):
        start = time.perf_counter()
        solver = Solver(spec, AlignSettings(), workers)
        for n in names:
            solver.submit(n, stats)
        solver.results()
        out[str(workers)] = round(time.perf_counter() - start, 2)
    return {"width": width, "spaces": spaces, "seconds_by_workers": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="where the random pairs are kept")
    ap.add_argument("--repeats", type=int, default=5,
                    help="runs of floor and align per depth: median time, highest peak")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    ap.add_argument("--learned", type=int, default=0, metavar="STEPS",
                    help="also run matching=learned with this many steps (once per depth)")
    ap.add_argument("--no-cached", action="store_true",
                    help="skip the cached first run (it writes every layer's float64 statistics)")
    ap.add_argument("--no-solve", action="store_true", help="skip the solver benchmark")
    ap.add_argument("--results", default=None, help="the results file (default: "
                    "benchmarks/results/scale-DEVICE[-SHAPE].json)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mkp-scale-"))
    cache = work / "cache"
    env = {"MERGEKIT_PERMUTE_CACHE": str(cache)}
    baseline = probe("none")
    rows = []
    for layers in args.layers:
        a, b = make_pair(work, layers, args.shape, args.device)
        checkpoint_mib = (Path(b) / "model.safetensors").stat().st_size / 2**20
        out = work / f"aligned-{layers}"
        floors, runs, cached, solving = [], [], [], []
        for _ in range(args.repeats):   # interleaved, so drifts of the machine hit all alike
            floors.append(probe("floor", a, b, args.device))
            runs.append(probe("cli", "align", a, b, *CALIB, "--device", args.device,
                              "--cache", "off", "--out", str(out), "--overwrite", env=env))
            timings = json.loads((out / "alignment.json").read_text())["timings"]
            solving.append(sum(timings["solve_seconds"].values()))
            if not args.no_cached:
                cached.append(probe("cli", "align", a, b, *CALIB, "--device", args.device,
                                    "--no-cache", "--out", str(out), "--overwrite", env=env))
        written = {str(t.dtype) for t in __import__("safetensors.torch", fromlist=["load_file"])
                   .load_file(str(out / "model.safetensors")).values()}
        align_s = statistics.median(r["seconds"] for r in runs)
        floor_s = statistics.median(f["seconds"] for f in floors)
        above = max(r["peak_rss_mib"] for r in runs) - baseline["peak_rss_mib"]
        row = {"layers": layers, "checkpoint_mib": round(checkpoint_mib, 1),
               "align_seconds": round(align_s, 2), "floor_seconds": round(floor_s, 2),
               "time_vs_floor": round(align_s / floor_s, 2),
               "align_seconds_each": [round(r["seconds"], 2) for r in runs],
               "floor_seconds_each": [round(f["seconds"], 2) for f in floors],
               "solve_seconds": round(statistics.median(solving), 2),
               "peak_rss_above_import_mib": round(above, 1),
               "peak_rss_above_import_each": [round(r["peak_rss_mib"] - baseline["peak_rss_mib"], 1)
                                              for r in runs],
               "peak_vs_checkpoint": round(above / checkpoint_mib, 2),
               "peak_gpu_mib": round(max(r["peak_gpu_mib"] for r in runs), 1),
               "floor_peak_gpu_mib": round(max(f["peak_gpu_mib"] for f in floors), 1),
               "floor_peak_rss_above_import_mib": round(max(f["peak_rss_mib"] for f in floors)
                                                        - baseline["peak_rss_mib"], 1),
               "written_dtypes": sorted(written)}
        if cached:
            row.update(
                cached_seconds=round(statistics.median(r["seconds"] for r in cached), 2),
                cached_time_vs_floor=round(
                    statistics.median(r["seconds"] for r in cached) / floor_s, 2),
                cached_peak_rss_above_import_each=[
                    round(r["peak_rss_mib"] - baseline["peak_rss_mib"], 1) for r in cached])
        if args.learned:
            learned = probe("cli", "align", a, b, *CALIB, "--device", args.device,
                            "--matching", "learned", "--learn-steps", str(args.learned),
                            "--cache", "off", "--permutations-only", "--out", str(out),
                            "--overwrite", env=env)
            row["learned"] = {"steps": args.learned, "seconds": round(learned["seconds"], 2),
                              "time_vs_floor": round(learned["seconds"] / floor_s, 2),
                              "peak_gpu_mib": round(learned["peak_gpu_mib"], 1),
                              "peak_rss_above_import_mib": round(
                                  learned["peak_rss_mib"] - baseline["peak_rss_mib"], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"benchmark": "scale", "device": args.device, "shape": SHAPES[args.shape],
           "shape_name": args.shape, "calibration": CALIB,
           "repeats": args.repeats,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "import_baseline_rss_mib": round(baseline["peak_rss_mib"], 1), "rows": rows,
           "date": time.strftime("%Y-%m-%d")}
    if not args.no_solve:
        doc["solve"] = solve_benchmark()
        print(json.dumps(doc["solve"]), flush=True)
    if len(rows) > 1:
        doc["peak_growth_first_to_last_depth"] = round(
            rows[-1]["peak_rss_above_import_mib"] / rows[0]["peak_rss_above_import_mib"], 2)
    (HERE / "results").mkdir(exist_ok=True)
    suffix = "" if args.shape == "toy" else f"-{args.shape}"
    results = Path(args.results or HERE / "results" / f"scale-{args.device.split(':')[0]}{suffix}.json")
    results.write_text(
        json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
