"""realistic_zoo.py's data windows, held-out scoring, models and optimizer: pure functions of
their arguments (the zoo's paths, corpus and stop rule stay in realistic_zoo.py, which the other
zoo scripts point at their own)."""

import math
from typing import Dict, List, Optional

import torch
import transformers as T

from mergekit_permute.io.batches import mask_tokens

EVAL_MASK_SEED = 1234        # the held-out BERT masking, identical for every model
EVAL_MASK_PROB = 0.15


def token_stream(tok, texts: List[str]) -> torch.Tensor:
    """All passages tokenized (no specials) and joined, each followed by [SEP]."""
    sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for seq in ids for t in seq + [sep]], dtype=torch.long)


def windows(stream: torch.Tensor, arch: str, seq_len: int, cls_id: int, offset: int = 0
            ) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens (BERT: [CLS] + seq_len-1 stream tokens)."""
    width = seq_len - 1 if arch == "bert" else seq_len
    n = (len(stream) - offset) // width
    w = stream[offset:offset + n * width].view(n, width)
    if arch == "bert":
        w = torch.cat([torch.full((n, 1), cls_id, dtype=torch.long), w], dim=1)
    return w


class Batches:
    """Epochs of windows: a fresh offset and order from `gen` every epoch."""

    def __init__(self, stream, arch, seq_len, batch, cls_id, gen):
        self.stream, self.arch, self.seq_len, self.batch, self.cls_id, self.gen = \
            stream, arch, seq_len, batch, cls_id, gen
        self.epoch, self.queue = 0, []

    def next(self, seq_len: Optional[int] = None, batch: Optional[int] = None) -> torch.Tensor:
        """The next batch; a new (seq_len, batch) starts a fresh pass over the stream."""
        seq_len, batch = seq_len or self.seq_len, batch or self.batch
        if seq_len != self.seq_len:
            self.seq_len, self.queue = seq_len, []
        if len(self.queue) < batch:
            offset = int(torch.randint(self.seq_len, (1,), generator=self.gen))
            w = windows(self.stream, self.arch, self.seq_len, self.cls_id, offset)
            self.queue = list(w[torch.randperm(len(w), generator=self.gen)])
            self.epoch += 1
        out, self.queue = self.queue[:batch], self.queue[batch:]
        return torch.stack(out)


def mask_train(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int,
               gen: torch.Generator, prob: float, p_mask: float = 0.8, p_random: float = 0.1):
    """BERT masking with configurable replacement: of the chosen `prob` of tokens, p_mask get
    [MASK], p_random a random token, the rest stay (0.8/0.1 = mergekit_permute.io.batches.mask_tokens)."""
    labels = ids.clone()
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ~special
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=gen)
    inputs[chosen & (roll < p_mask)] = mask_id
    rand_pos = chosen & (roll >= p_mask) & (roll < p_mask + p_random)
    inputs[rand_pos] = torch.randint(5, vocab, ids.shape, generator=gen)[rand_pos]
    return inputs, labels


def special_mask(tok, ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(ids, torch.tensor(tok.all_special_ids))


def eval_set(tok, arch: str, cfg: Dict, eval_texts: List[str]):
    """Fixed held-out (inputs, labels): causal labels = inputs (shifted in the loss)."""
    w = windows(token_stream(tok, eval_texts), arch, cfg["seq_len"], tok.cls_token_id)
    w = w[:cfg["eval_windows"]]
    if arch == "bert":
        gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
        return mask_tokens(w, special_mask(tok, w), tok.mask_token_id, len(tok), gen,
                           EVAL_MASK_PROB)
    return w, w


def targets(arch: str, labels: torch.Tensor) -> torch.Tensor:
    """The token ids a model is scored on."""
    return labels[labels != -100] if arch == "bert" else labels[:, 1:].reshape(-1)


def unigram_loss(tok, arch: str, train_stream: torch.Tensor, eval_labels: torch.Tensor) -> float:
    """Add-one smoothed unigram (fit on the train targets) on the held-out targets (nats)."""
    ids = train_stream
    if arch == "bert":  # BERT only ever predicts non-special tokens
        ids = ids[~special_mask(tok, ids)]
    counts = torch.bincount(ids, minlength=len(tok)).double()
    logp = torch.log((counts + 1) / (counts.sum() + len(tok)))
    return float(-logp[targets(arch, eval_labels)].mean())


@torch.no_grad()
def held_out_loss(model, arch: str, inputs: torch.Tensor, labels: torch.Tensor, bs: int = 64,
                  mask_id: Optional[int] = None) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), bs):
        x, y = inputs[i:i + bs], labels[i:i + bs]
        logits = model(input_ids=x).logits.float()
        if arch != "bert":
            logits, y = logits[:, :-1], y[:, 1:]
        if mask_id is not None:  # diagnostics: only the positions whose input is [MASK]
            y = y.masked_fill(x != mask_id, -100)
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
            reduction="sum"))
        count += int((y != -100).sum())
    model.train(was)
    return total / count


# ---------------------------------------------------------------------------------------------
# models and optimizer

def build_model(cfg: Dict, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    a = cfg["arch"]
    common = dict(vocab_size=vocab_size, hidden_size=cfg["hidden"],
                  num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                  intermediate_size=cfg["intermediate"], max_position_embeddings=cfg["seq_len"],
                  pad_token_id=0)
    if a == "bert":  # stock post-LN BERT
        config = T.BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config.architectures = ["BertForMaskedLM"]
        return T.BertForMaskedLM(config)
    if a == "neox":  # Pythia-style: parallel residual, partial rotary, untied head
        config = T.GPTNeoXConfig(**common, rotary_pct=cfg["rotary_pct"], use_parallel_residual=True,
                                 bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                                 hidden_dropout=0.0, attention_dropout=0.0)
        config.architectures = ["GPTNeoXForCausalLM"]
        return T.GPTNeoXForCausalLM(config)
    if a == "gpt2":  # GPT-2: pre-LN, learned positions, tied head (the Theus et al. anchor)
        config = T.GPT2Config(vocab_size=vocab_size, n_embd=cfg["hidden"], n_layer=cfg["layers"],
                              n_head=cfg["heads"], n_inner=cfg["intermediate"],
                              n_positions=cfg["seq_len"], bos_token_id=2, eos_token_id=3,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config.architectures = ["GPT2LMHeadModel"]
        return T.GPT2LMHeadModel(config)
    config = T.LlamaConfig(**common, num_key_value_heads=cfg["kv_heads"], bos_token_id=2,
                           eos_token_id=3, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    return T.LlamaForCausalLM(config)


def make_optimizer(model, cfg: Dict):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=tuple(cfg["betas"]))
    warm, total, floor = cfg["warmup"], cfg["max_steps"], cfg["min_lr_frac"]

    def lr_at(s):  # linear warmup, cosine to floor*lr at max_steps
        if s < warm:
            return (s + 1) / warm
        t = min(1.0, (s - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def seq_at(cfg: Dict, step: int):
    """Sequence-length warmup: (seq_len, batch) at a 1-based step, same tokens per step.

    `seq_warmup` = [[len, steps], ...] runs first; then cfg seq_len/batch. A bidirectional MLM
    on long windows at init averages its context over all positions, which dilutes the signal
    it needs to learn to attend to its neighbours; on 8-token windows it learns that within a
    few hundred steps (measured here: 128-token windows stay on the unigram+copy plateau for
    1500+ steps, 8-token windows leave it by step 200).
    """
    tokens = cfg["seq_len"] * cfg["batch"]
    end = 0
    for length, steps in cfg.get("seq_warmup") or []:
        end += steps
        if step <= end:
            return length, tokens // length
    return cfg["seq_len"], cfg["batch"]
