"""Performance benchmark: ratios measured in one run, medians of repeated runs.

    python benchmarks/perf.py [--repeats 3] [--device cpu]
Results: benchmarks/results/perf-{device}.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` as a package

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

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def calibration_overhead(a_path, b_path, repeats, device):
    """Calibration pass (hooks + statistics) vs. the bare forward passes of both models."""
    from mergekit_permute.align import calibration_spaces
    from mergekit_permute.calibrate import calibrate, tokenize
    from mergekit_permute.data import load_texts
    from mergekit_permute.models import load_pair
    spec, a, b, tok = load_pair(a_path, b_path, device=device)
    batches = tokenize(tok, load_texts("shakespeare-calib", 256), 64, 16)

    @torch.no_grad()
    def bare():
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items()}
            a(**inputs)
            b(**inputs)

    def hooked():
        calibrate(a, b, spec, batches, calibration_spaces(spec), device=device)
    bare()  # warm-up
    t_bare, t_cal = timed(bare, repeats), timed(hooked, repeats)
    tokens = int(sum(int(x["attention_mask"].sum()) for x in batches))
    return {"tokens": tokens, "bare_forward_s": t_bare, "calibration_s": t_cal,
            "ratio": t_cal / t_bare, "target": "<= 1.3"}


def stats_scaling(repeats, device):
    """Streaming cross block vs. the reference's full 2d x 2d covariance, and LSA time."""
    from mergekit_permute.stats import CrossStats
    rows = []
    for d in (512, 1024, 2048, 4096):
        n = 8192
        a = torch.randn(n, d, device=device)
        b = torch.randn(n, d, device=device)

        def cross():
            s = CrossStats.zeros(d, d, device=device)
            s.update(a, b)
            s.correlation()

        def full():  # same arithmetic (float32 products, float64 result), all 2d x 2d entries
            x = torch.cat([a, b], 1)
            mean = x.mean(0, dtype=torch.float64)
            cov = (x.T @ x).double() / n - mean[:, None] * mean[None, :]
            std = cov.diagonal().sqrt()
            (cov / std[:, None] / std[None, :])[:d, d:]
        corr = np.random.default_rng(0).standard_normal((d, d))
        rows.append({"width": d, "tokens": n, "cross_block_s": timed(cross, repeats),
                     "full_cov_s": timed(full, repeats),
                     "assignment_s": timed(lambda: linear_sum_assignment(corr, maximize=True),
                                           max(1, repeats if d <= 2048 else 1))})
        rows[-1]["full_over_cross"] = rows[-1]["full_cov_s"] / rows[-1]["cross_block_s"]
    tok_rows = []
    for n in (2048, 8192, 32768):
        d = 1024
        a, b = torch.randn(n, d, device=device), torch.randn(n, d, device=device)

        def cross():
            s = CrossStats.zeros(d, d, device=device)
            s.update(a, b)
        tok_rows.append({"width": d, "tokens": n, "cross_block_s": timed(cross, repeats)})
    return {"by_width": rows, "by_tokens": tok_rows}


def per_space(a_path, b_path):
    from mergekit_permute.align import AlignSettings, collect_stats, compute_alignment
    from mergekit_permute.data import load_texts
    from mergekit_permute.match import match_attention, match_plain
    from mergekit_permute.models import load_pair
    spec, a, b, tok = load_pair(a_path, b_path)
    settings = AlignSettings(samples=256, max_length=64)
    stats = collect_stats(spec, a, b, tok, load_texts("shakespeare-calib", 256), settings,
                          use_cache=False)
    out = {}
    for space in spec.spaces:
        if space.kind == "residual":
            t = time.perf_counter()
            compute_alignment(spec, stats, AlignSettings(ffn="identity", attention="identity",
                                                         residual="all"))
        else:
            corr = stats[f"{space.name}@0"].correlation()
            t = time.perf_counter()
            match_plain(corr) if space.kind == "ffn" else match_attention(corr, space.heads, "head_perm")
        out.setdefault(space.kind, []).append(time.perf_counter() - t)
    return {k: {"spaces": len(v), "total_s": sum(v)} for k, v in out.items()}


def end_to_end(a_path, b_path, repeats):
    """merge_method permute vs. linear through MergeKit on the same pair (fresh stats cache)."""
    import yaml

    from mergekit_permute import method as permute_method
    from mergekit_permute.merging import run_recipe
    times = {}
    for method in ("linear", "permute"):
        runs = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["MERGEKIT_PERMUTE_CACHE"] = str(Path(tmp) / "cache")
                recipe = Path(tmp) / "r.yml"
                params = {"calibration_samples": 256, "max_length": 64} if method == "permute" \
                    else {"weight": 1.0}
                recipe.write_text(yaml.safe_dump({
                    "merge_method": method, "base_model": a_path, "dtype": "float32",
                    "models": [{"model": a_path}, {"model": b_path}], "parameters": params}))
                permute_method._ALIGNMENTS.clear()  # no in-process reuse between repeats
                t = time.perf_counter()
                run_recipe(recipe, Path(tmp) / "out")
                runs.append(time.perf_counter() - t)
        times[method] = statistics.median(runs)
    return {**{f"{k}_s": v for k, v in times.items()}, "ratio": times["permute"] / times["linear"]}


MEMORY_SCRIPT = r"""
import resource, sys, torch, transformers as T
from pathlib import Path
root = Path(sys.argv[1])
for seed in (0, 1):
    cfg = T.LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    T.LlamaForCausalLM(cfg).save_pretrained(root / f"m{seed}")
"""


def peak_memory(tok_src):
    """Peak RSS of `mergekit-permute align` on a ~100M-parameter pair, vs. one model in fp32."""
    import shutil
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, tmp], check=True)
        for m in ("m0", "m1"):
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(Path(tok_src) / f, root / m / f)
        model_bytes = (root / "m0" / "model.safetensors").stat().st_size
        probe = ("import resource,subprocess,sys;"
                 "subprocess.run(sys.argv[1:]);"
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        base = subprocess.run([sys.executable, "-c", probe, sys.executable, "-c",
                               "import torch, transformers, mergekit_permute.align"],
                              capture_output=True, text=True)
        cli = str(Path(sys.executable).parent / "mergekit-permute")
        run = subprocess.run([sys.executable, "-c", probe, cli, "align", str(root / "m0"),
                              str(root / "m1"), "--data", "shakespeare-calib", "--samples", "64",
                              "--max-length", "64", "--no-cache", "--out", str(root / "out")],
                             capture_output=True, text=True)
        peak = int(run.stdout.split()[-1]) * 1024
        baseline = int(base.stdout.split()[-1]) * 1024
        return {"model_fp32_bytes": model_bytes, "peak_rss_bytes": peak,
                "import_baseline_rss_bytes": baseline,
                "ratio_to_one_model": (peak - baseline) / model_bytes, "target": "<= 2.5"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from benchmarks.zoo import zoo
    _, paths = zoo("llama", 2)
    a, b = paths[0], paths[1]
    doc = {"machine": f"{platform.machine()} {os.cpu_count()} CPU threads, torch {torch.__version__}",
           "device": args.device, "pair": [a, b], "repeats": args.repeats}
    print("calibration overhead", flush=True)
    doc["calibration_overhead"] = calibration_overhead(a, b, args.repeats, args.device)
    print("statistics scaling", flush=True)
    doc["stats_scaling"] = stats_scaling(args.repeats, args.device)
    print("per space", flush=True)
    doc["matching_per_kind"] = per_space(a, b)
    print("end to end", flush=True)
    doc["end_to_end"] = end_to_end(a, b, args.repeats)
    print("peak memory", flush=True)
    doc["peak_memory"] = peak_memory(a)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"perf-{args.device.split(':')[0]}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
