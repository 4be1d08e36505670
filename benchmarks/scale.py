"""Scale benchmark at the shapes users run: memory flat in depth, time against the floor.
Random-init bf16 pairs of a `--shape`:
  toy        Llama, hidden 512, FF 1408, 8 / 2 heads (the quick CI-sized smoke)
  tinyllama  Llama, 2048 / 5632, 32 query / 4 KV heads, vocabulary 32000 (TinyLlama-1.1B)
  bert-base  BERT, 768 / 3072, 12 heads, vocabulary 30522 (MultiBERTs)
  pythia-410m  GPT-NeoX, 1024 / 4096, 16 heads, parallel residual, vocabulary 50304
  llama7b    Llama, 4096 / 11008, 32 / 32 heads (a GPU shape)
  llama3-1b, mistral7b  Llama, 2048 / 8192 and 4096 / 14336 (FF widths for the assignment
             benchmark's correlation matrices)
at `--layers` depths; calibration 64 x 64 tokens for `toy`, 128 x 128 for the others.

Every measurement runs in its own process; its peak memory is the larger of its own resident
high-water mark (VmHWM: getrusage's ru_maxrss is carried across exec from this parent, which
holds the pair it built, so runs that built their pair read up to a whole float32 model high:
the "growth with depth" of earlier rows) and, sampled every 20 ms, its resident memory plus
the proportional resident memory (PSS) of any process it starts. Floor and align alternate
`--repeats` times per depth (median time, highest peak):
  floor   load both models (in align's compute dtype) and run their bodies' bare forwards
          (embeddings and blocks, no vocabulary head) over the same batches;
  align   `mergekit-permute align --cache off` (calibration, solving, writing aligned B);
  cached  `mergekit-permute align --no-cache`: a first run's default path, which also hashes
          both checkpoints and writes every layer's statistics to the cache.
Peak memory is reported above the import baseline, as a multiple of one bf16 checkpoint of
the depth run and (`--per-checkpoint-layers`) of the full-depth model, beside what must be
resident: two blocks, both models' hidden states, one layer's statistics. `--variant
no-heap-tuning` also runs align with calibration/heap.py switched off (glibc's own thresholds,
no trims); `--variant float32-products` / `bfloat16-products` run align with
`--stats-products float32` / `bfloat16` (auto: bfloat16 for half checkpoints on CUDA only). The
peak's own resident memory is split into anonymous (tensors, heap) and file-backed (mappings).
`plain-heap` and `no-outside-heap` (long-lived buffers' own mappings off) were
measured before those mappings were removed (results/scale-variants-cpu-tinyllama.json).
`--learned STEPS` also runs `matching: learned` (blocks recomputed in the backward pass at these
sizes), and with `--learned-whole-model` the whole-model backward beside it.

    python benchmarks/scale.py --shape tinyllama --layers 4 8 22 --repeats 1 --no-cached
    python benchmarks/scale.py --shape bert-base --layers 12 --repeats 1 --no-cached
    python benchmarks/scale.py --shape pythia-410m --layers 24 --repeats 1 --no-cached
    python benchmarks/scale.py --shape toy --layers 8 16 32      # the CPU smoke
    python benchmarks/scale.py --shape tinyllama --layers 2 --repeats 1 --no-cached \
        --no-solve --learned 3 --learned-whole-model \
        --results benchmarks/results/scale-learned-cpu-tinyllama.json
(each results file records its command; BENCHMARKS.md prints it, or for files written before
that, the command their recorded settings imply)
    bash benchmarks/gpu.sh   # one H100, under 8 minutes: these two
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
sys.path.insert(0, str(HERE.parent))
from mergekit_permute.calibration.collect import native_bf16_cpu  # noqa: E402

LLAMA = dict(model="LlamaForCausalLM", config="LlamaConfig", tie_word_embeddings=False)
SHAPES = {
    "toy": dict(LLAMA, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256),
    "tinyllama": dict(LLAMA, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      full_layers=22),
    "bert-base": dict(model="BertForMaskedLM", config="BertConfig", hidden_size=768,
                      intermediate_size=3072, num_attention_heads=12, vocab_size=30522,
                      max_position_embeddings=512, full_layers=12),
    "pythia-410m": dict(model="GPTNeoXForCausalLM", config="GPTNeoXConfig", hidden_size=1024,
                        intermediate_size=4096, num_attention_heads=16, vocab_size=50304,
                        max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                        tie_word_embeddings=False, full_layers=24),
    "llama7b": dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                    full_layers=32),
    # two more FF widths for the assignment benchmark (benchmarks/real_correlations.py)
    "llama3-1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
                      full_layers=16),
    "mistral7b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
                      full_layers=32),
}


def calibration(shape: str):
    n = "64" if shape == "toy" else "128"
    return ["--data", "shakespeare-calib", "--samples", n, "--max-length", n, "--batch-size", "8"]


PROBE = """
import sys, time, json, os, threading
mode, variant, args = sys.argv[1], sys.argv[2], sys.argv[3:]
import torch, transformers, mergekit_permute.cli  # the same imports in every mode
from transformers import PreTrainedTokenizerFast  # noqa: F401


def children_pss():
    # PSS of every descendant (the solver pool): shared pages counted once in all
    pids, total = [], 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids += [int(c) for c in f.read().split()]
    while pids:
        pid = pids.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("Pss:")) * 1024
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def own_rss():
    # resident bytes: anonymous (heap, tensors) and file-backed (mapped files, libraries)
    with open("/proc/self/status") as f:
        kb = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith("Rss")}
    return kb["RssAnon"] * 1024, (kb["RssFile"] + kb["RssShmem"]) * 1024


peak, done = {"tree": 0, "children": 0, "anon": 0, "file": 0}, threading.Event()
def sample():
    while not done.wait(0.02):
        kids = children_pss()
        peak["children"] = max(peak["children"], kids)
        anon, file = own_rss()
        if anon + file + kids > peak["tree"]:   # the peak's parts, at the peak
            peak.update(tree=anon + file + kids, anon=anon, file=file)
threading.Thread(target=sample, daemon=True).start()
if variant == "learn-whole-model":   # learned alignment without recomputed blocks
    import mergekit_permute.align.learn
    mergekit_permute.align.learn.CHECKPOINT_FROM = float("inf")
elif variant == "no-heap-tuning":   # calibration/heap.py: glibc's own thresholds, no trims
    from mergekit_permute.calibration import heap
    for mod in [m for n, m in sys.modules.items() if n.startswith("mergekit_permute")]:
        for name in ("own_heap", "flat_heap", "trim_heap"):
            if hasattr(mod, name):
                setattr(mod, name, lambda: None)
    heap.HeapWatch.settle = heap.HeapWatch.check = lambda self: None
elif variant == "float32-products":   # the statistics' cross products in float32 (not auto)
    args = [*args, "--stats-products", "float32"]
elif variant == "bfloat16-products":   # ... in bfloat16 (auto picks float32 on a CPU)
    args = [*args, "--stats-products", "bfloat16"]
start = time.perf_counter()
if mode == "floor":
    from mergekit_permute.io.batches import tokenize
    from mergekit_permute.io.data import load_texts
    a, b, device, n = args
    tok = transformers.AutoTokenizer.from_pretrained(a)
    tok.pad_token = tok.pad_token or tok.eos_token
    # forwards in align's compute dtype: the checkpoint's (bf16) on a GPU, float32 on the CPU
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cls = getattr(transformers, transformers.AutoConfig.from_pretrained(a).architectures[0])
    # the body align runs (embeddings and blocks), not the vocabulary head it never needs
    models = [getattr(m, m.base_model_prefix) for m in
              (cls.from_pretrained(p, dtype=dtype).to(device) for p in (a, b))]
    batches = tokenize(tok, load_texts("shakespeare-calib", int(n)), int(n), 8)
    with torch.no_grad():
        for m in models:
            kw = {"use_cache": False} if "use_cache" in m.forward.__code__.co_varnames else {}
            for batch in batches:
                m(**{k: v.to(device) for k, v in batch.items()}, **kw)
elif mode == "cli":
    sys.argv = ["mergekit-permute", *args]
    try:
        mergekit_permute.cli.main()
    except SystemExit as e:
        assert not e.code, e.code
seconds = time.perf_counter() - start
done.set()
gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
# The exact high-water mark of this process's own memory: VmHWM, not getrusage's ru_maxrss,
# which Linux carries across exec from the parent (benchmarks/scale.py itself, which built the
# pair: gigabytes at 22 layers), so a child's ru_maxrss is never below its parent's.
with open("/proc/self/status") as f:
    own = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
print(json.dumps({"seconds": seconds, "peak_gpu_mib": gpu, "peak_rss_mib": own / 2**20,
                  "peak_tree_mib": max(peak["tree"], own) / 2**20,
                  "peak_children_mib": peak["children"] / 2**20,
                  "peak_anon_mib": peak["anon"] / 2**20, "peak_file_mib": peak["file"] / 2**20}))
"""


def probe(mode: str, *args: str, variant: str = "default", env=None) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, mode, variant, *args], capture_output=True,
                       text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def config_of(shape: str, layers: int):
    import transformers as T
    dims = {k: v for k, v in SHAPES[shape].items() if k not in ("model", "config", "full_layers")}
    config = getattr(T, SHAPES[shape]["config"])(num_hidden_layers=layers, pad_token_id=0,
                                                 bos_token_id=2, eos_token_id=3, **dims)
    config.architectures = [SHAPES[shape]["model"]]
    return config


def make_pair(root: Path, layers: int, shape: str = "toy", device: str = "cpu"):
    """A random-init bf16 pair of the shape (built on `device`: a GPU builds a 7B pair in
    seconds), with a tokenizer trained on the shipped text."""
    import torch
    import transformers as T

    from mergekit_permute.io.data import load_texts
    from mergekit_permute.zoo import build_tokenizer
    family = "bert" if SHAPES[shape]["model"].startswith("Bert") else "llama"
    tok = build_tokenizer(min(SHAPES[shape]["vocab_size"], 8192), family,
                          load_texts("shakespeare-train", 4000))
    paths = []
    for seed in (0, 1):
        path = root / f"{shape}-{layers}-{seed}"
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            with torch.device(device):
                model = getattr(T, SHAPES[shape]["model"])(config_of(shape, layers))
            model.to(torch.bfloat16).save_pretrained(path)
            del model
            tok.save_pretrained(path)
        paths.append(str(path))
    return paths


def bf16_mib(shape: str, layers: int) -> float:
    import torch
    import transformers as T
    with torch.device("meta"):
        model = getattr(T, SHAPES[shape]["model"])(config_of(shape, layers))
    return sum(p.numel() for p in model.parameters()) * 2 / 2**20


def parts_of(timings: dict) -> dict:
    """Where a run's time went, from its alignment.json timings (seconds): calibration (the
    forwards and the statistics), solving, writing aligned B, the function check."""
    solve = sum(timings["solve_seconds"].values())
    return {"calibration": round(timings["total_seconds"] - solve, 1), "solve": round(solve, 1),
            "write": timings["write_seconds"],
            "function_check": timings.get("function_check_seconds", 0.0)}


def products_vs_forwards(shape: str, layers: int) -> float:
    """FLOPs of the statistics' cross products (A x B block of every calibrated point) over
    those of both models' bare forwards (2 per linear weight per token; attention scores at 128
    tokens add about 1%), per calibration token. Where both run at one GEMM rate (a CPU, float32),
    calibration alone takes about 1 + this times the floor, before any solve or write."""
    import torch
    import transformers as T

    from mergekit_permute.calibration.collect import calibration_spaces
    from mergekit_permute.spec import spec_for_config
    config = config_of(shape, layers)
    spec = spec_for_config(config)
    products = sum(2 * spec.space(s).size ** 2 * len(spec.space(s).features)
                   for s in calibration_spaces(spec))
    with torch.device("meta"):
        model = getattr(T, SHAPES[shape]["model"])(config)
    body = getattr(model, model.base_model_prefix)
    weights = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))
    return products / (2 * 2 * weights)


def resident(shape: str, layers: int, samples: int, device: str) -> dict:
    """MiB that must be resident while a block runs: two blocks in the compute dtype, both
    models' hidden states, one layer's statistics (float64 sums and float32 pending products
    of every space the layer writes, the residual stream's too)."""
    import torch

    from mergekit_permute.spec import spec_for_config
    config = config_of(shape, 1)
    with torch.device("meta"):
        model = __import__("transformers").AutoModel.from_config(config)
    block = sum(p.numel() for n, p in model.named_parameters() if ".0." in n or n.startswith("0."))
    compute = 4 if device == "cpu" else 2
    spec = spec_for_config(config_of(shape, layers))
    sizes = [s.size for s in spec.spaces if s.layer in (0, None)]
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    out = {"two_blocks": mib(2 * block * compute),
           "hidden_states": mib(2 * samples * samples * config.hidden_size * 4),
           "one_layer_statistics": mib(sum(12 * n * n for n in sizes))}
    out["total"] = round(sum(out.values()), 1)
    return out


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


def _mib(x: float) -> float:
    return round(x, 1)


def run_depth(args, work: Path, layers: int, baseline: dict, env: dict) -> dict:
    a, b = make_pair(work, layers, args.shape, args.device)
    calib = calibration(args.shape)
    samples = int(calib[calib.index("--samples") + 1])
    checkpoint_mib = sum(f.stat().st_size for f in Path(b).glob("*.safetensors")) / 2**20
    full = SHAPES[args.shape].get("full_layers", layers)
    full_mib = bf16_mib(args.shape, full)   # the full-depth model's one bf16 checkpoint
    out = work / f"aligned-{layers}"
    floors, runs, cached = [], {v: [] for v in args.variant}, []
    for _ in range(args.repeats):   # interleaved, so drifts of the machine hit all alike
        floors.append(probe("floor", a, b, args.device, str(samples)))
        for variant in args.variant:
            r = probe("cli", "align", a, b, *calib, "--device", args.device, "--cache", "off",
                      "--out", str(out), "--overwrite", variant=variant, env=env)
            doc = json.loads((out / "alignment.json").read_text())
            r["timings"], r["function_check"] = doc["timings"], doc.get("function_check")
            runs[variant].append(r)
        if not args.no_cached:
            cached.append(probe("cli", "align", a, b, *calib, "--device", args.device,
                                "--no-cache", "--out", str(out), "--overwrite", env=env))
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    floor_s = statistics.median(f["seconds"] for f in floors)
    base = baseline["peak_tree_mib"]
    row = {"layers": layers, "checkpoint_mib": _mib(checkpoint_mib),
           f"full_{full}_layer_checkpoint_mib": _mib(full_mib),
           "floor_seconds": round(floor_s, 2),
           "floor_seconds_each": [round(f["seconds"], 2) for f in floors],
           "floor_peak_above_import_mib": _mib(max(f["peak_tree_mib"] for f in floors) - base),
           "floor_peak_gpu_mib": _mib(max(f["peak_gpu_mib"] for f in floors)),
           "must_be_resident_mib": resident(args.shape, layers, samples, args.device),
           "products_vs_forwards": round(products_vs_forwards(args.shape, layers), 3),
           "written_dtypes": written, "variants": {}}
    for variant, rs in runs.items():
        align_s = statistics.median(r["seconds"] for r in rs)
        above = max(r["peak_tree_mib"] for r in rs) - base
        per_space = rs[0]["timings"]["solve_seconds"]
        kinds: dict = {}
        for name, sec in per_space.items():
            kind = "residual" if name == "residual" else name.split(".")[0] \
                if "." in name else name
            kinds.setdefault(kind, []).append(sec)
        row["variants"][variant] = {
            "align_seconds": round(align_s, 2), "time_vs_floor": round(align_s / floor_s, 2),
            "align_seconds_each": [round(r["seconds"], 2) for r in rs],
            "peak_above_import_mib": _mib(above),
            "peak_above_import_each": [_mib(r["peak_tree_mib"] - base) for r in rs],
            "solver_processes_peak_mib": _mib(max(r["peak_children_mib"] for r in rs)),
            # the sampled peak's own resident memory: anonymous, and file-backed (mappings)
            "peak_anon_mib": _mib(max(r.get("peak_anon_mib", 0) for r in rs)),
            "peak_file_backed_mib": _mib(max(r.get("peak_file_mib", 0) for r in rs)),
            "peak_vs_checkpoint": round(above / checkpoint_mib, 2),
            f"peak_vs_full_{full}_layer_checkpoint": round(above / full_mib, 2),
            "solve_seconds_total": round(sum(per_space.values()), 2),
            "solve_seconds_by_space": {k: {"spaces": len(v), "max": round(max(v), 2),
                                           "median": round(statistics.median(v), 2)}
                                       for k, v in sorted(kinds.items())},
            "peak_gpu_mib": _mib(max(r["peak_gpu_mib"] for r in rs)),
            "parts_seconds": parts_of(rs[0]["timings"]),
            "function_check": rs[0]["function_check"]}
    if cached:
        cs = statistics.median(r["seconds"] for r in cached)
        row["cached"] = {"seconds": round(cs, 2), "time_vs_floor": round(cs / floor_s, 2),
                         "peak_above_import_each": [_mib(r["peak_tree_mib"] - base)
                                                    for r in cached]}
    for variant in (["default", "learn-whole-model"] if args.learned_whole_model else
                    ["default"]) if args.learned else []:
        learned = probe("cli", "align", a, b, *calib, "--device", args.device,
                        "--matching", "learned", "--learn-steps", str(args.learned),
                        "--cache", "off", "--permutations-only", "--out", str(out),
                        "--overwrite", variant=variant, env=env)
        doc = json.loads((out / "alignment.json").read_text())
        key = "learned" if variant == "default" else "learned_whole_model"
        row[key] = {"steps": args.learned, "seconds": round(learned["seconds"], 2),
                    "learn_seconds": doc["timings"].get("learn_seconds"),
                    "time_vs_floor": round(learned["seconds"] / floor_s, 2),
                    "peak_gpu_mib": _mib(learned["peak_gpu_mib"]),
                    "peak_above_import_mib": _mib(learned["peak_tree_mib"] - base),
                    "peak_vs_checkpoint": round((learned["peak_tree_mib"] - base)
                                                / checkpoint_mib, 2)}
    return row


def cpu_model() -> str:
    try:
        return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="where the random pairs are kept")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of floor and align per depth: median time, highest peak")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    ap.add_argument("--variant", nargs="+", default=["default"],
                    choices=["default", "no-heap-tuning", "float32-products",
                             "bfloat16-products"],
                    help="align as shipped, and with a piece of machinery switched off")
    ap.add_argument("--learned", type=int, default=0, metavar="STEPS",
                    help="also run matching=learned with this many steps (once per depth)")
    ap.add_argument("--learned-whole-model", action="store_true",
                    help="with --learned, also without recomputed blocks (learn.CHECKPOINT_FROM)")
    ap.add_argument("--no-cached", action="store_true",
                    help="skip the cached first run (it writes every layer's float64 statistics)")
    ap.add_argument("--no-solve", action="store_true", help="skip the solver benchmark")
    ap.add_argument("--results", default=None, help="the results file (default: "
                    "benchmarks/results/scale-DEVICE[-SHAPE].json)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mkp-scale-"))
    env = {"MERGEKIT_PERMUTE_CACHE": str(work / "cache")}
    baseline = probe("none")
    rows = []
    for layers in args.layers:
        rows.append(run_depth(args, work, layers, baseline, env))
        print(json.dumps(rows[-1]), flush=True)
    dims = {k: v for k, v in SHAPES[args.shape].items()}
    doc = {"benchmark": "scale", "device": args.device, "shape": dims,
           "shape_name": args.shape, "calibration": calibration(args.shape),
           "repeats": args.repeats, "variants": args.variant,
           "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(),
                       "platform": platform.platform(), "native_bf16_cpu": native_bf16_cpu(),
                       "gpu": __import__("torch").cuda.get_device_name()
                       if args.device.startswith("cuda") else None},
           "memory": "the larger of the process's resident high-water mark (VmHWM) and its resident "
                     "memory plus its children's PSS (sampled every 20 ms), above a process "
                     "that only imports",
           "import_baseline_mib": _mib(baseline["peak_tree_mib"]), "rows": rows,
           "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])}
    if not args.no_solve:
        doc["solve"] = solve_benchmark()
        print(json.dumps(doc["solve"]), flush=True)
    if len(rows) > 1:
        first, last = (r["variants"]["default"]["peak_above_import_mib"] for r in
                       (rows[0], rows[-1])) if "default" in args.variant else (0, 0)
        if first:
            doc["peak_growth_first_to_last_depth"] = round(last / first, 2)
    (HERE / "results").mkdir(exist_ok=True)
    suffix = "" if args.shape == "toy" else f"-{args.shape}"
    results = Path(args.results or HERE / "results" /
                   f"scale-{args.device.split(':')[0]}{suffix}.json")
    results.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
