"""The benchmark seed zoo: N seeds each of a small BERT masked-LM, a small Llama-style causal
LM with GQA and a small Pythia-style GPT-NeoX (pre-LayerNorm, parallel residual, partial
rotary), trained on the shipped Shakespeare text (seed = initialization + data order).
Cached under benchmarks/.zoo/ (a model is retrained only if its config changed).

    python benchmarks/zoo.py [--seeds 4] [--size cpu|gpu]
"""

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from mergekit_permute.zoo import ZooConfig, build_tokenizer, train_pair

ROOT = Path(__file__).resolve().parent / ".zoo"
SIZES = {
    "cpu": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=1024,
                seq_len=64, batch=32, steps=600),
    "gpu": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=2048, vocab=4096,
                seq_len=128, batch=64, steps=4000),
}


def zoo(arch: str, seeds: int, size: str = "cpu"):
    cfg = ZooConfig(arch=arch, **SIZES[size])
    return cfg, [str(p) for p in train_pair(cfg, range(1, seeds + 1), ROOT / size)]


def unigram_entropy(cfg: ZooConfig) -> float:
    """Cross-entropy (nats/token) of a unigram model fit on the training split, on eval text:
    the loss a model that learned nothing but token frequencies would reach."""
    from mergekit_permute.io.data import load_texts
    train, evals = load_texts("shakespeare-train"), load_texts("shakespeare-eval")
    tok = build_tokenizer(cfg.vocab, cfg.arch, train)
    counts = Counter(t for text in train for t in tok(text, add_special_tokens=False)["input_ids"])
    total, vocab = sum(counts.values()), len(tok)
    ids = [t for text in evals for t in tok(text, add_special_tokens=False)["input_ids"]]
    return -sum(math.log((counts[t] + 1) / (total + vocab)) for t in ids) / len(ids)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--arch", choices=["bert", "llama", "neox", "all"], default="all")
    args = ap.parse_args()
    for arch in (("bert", "llama", "neox") if args.arch == "all" else (args.arch,)):
        cfg, paths = zoo(arch, args.seeds, args.size)
        print(json.dumps({"arch": arch, "models": paths, "unigram": unigram_entropy(cfg)}))
