"""Small models trained here from different seeds, on the shipped public-domain text.

Used by the demo, the tests and the benchmarks. A seed changes both the initialization and the
data order, as in MultiBERTs. Everything is deterministic for a given seed on one machine.
"""

import logging
import math
from pathlib import Path
from typing import Dict, List, Literal

import torch
import transformers as T
from tokenizers import (
    Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers,
)
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from mergekit_permute.io.batches import mask_tokens
from mergekit_permute.io.data import load_texts

LOG = logging.getLogger(__name__)
Arch = Literal["bert", "llama", "neox", "phi3", "gemma", "gpt2"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class ZooConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    arch: Arch = "bert"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2          # GQA: llama, phi3, gemma
    intermediate: int = 512
    vocab: int = 1024
    seq_len: int = 64
    batch: int = 32
    steps: int = 400
    lr: float = 2e-3
    train_passages: int = 0    # 0 = all shipped training text


def build_tokenizer(vocab: int, arch: Arch, texts: List[str]) -> T.PreTrainedTokenizerFast:
    """A lowercase byte-level-free BPE trained on the shipped text (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                                       show_progress=False))
    if arch == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.BPEDecoder()
    kw = dict(pad_token="[PAD]", unk_token="[UNK]")
    if arch == "bert":
        kw.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        kw.update(bos_token="[CLS]", eos_token="[SEP]")
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **kw)


def build_model(cfg: ZooConfig, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    if cfg.arch == "bert":
        config = T.BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden,
                              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                              intermediate_size=cfg.intermediate,
                              max_position_embeddings=max(128, cfg.seq_len),
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              pad_token_id=0)
        config.architectures = ["BertForMaskedLM"]
        return T.BertForMaskedLM(config)
    if cfg.arch == "neox":  # Pythia-style: parallel residual, partial rotary, untied head
        config = T.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=cfg.hidden,
                                 intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                                 num_attention_heads=cfg.heads, rotary_pct=0.25,
                                 max_position_embeddings=max(128, cfg.seq_len), pad_token_id=0,
                                 bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                                 hidden_dropout=0.0, attention_dropout=0.0)
        config.architectures = ["GPTNeoXForCausalLM"]
        return T.GPTNeoXForCausalLM(config)
    if cfg.arch == "phi3":  # fused qkv_proj / gate_up_proj, untied head
        config = T.Phi3Config(vocab_size=vocab_size, hidden_size=cfg.hidden,
                              intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                              max_position_embeddings=max(128, cfg.seq_len), pad_token_id=0,
                              bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
        config.architectures = ["Phi3ForCausalLM"]
        return T.Phi3ForCausalLM(config)
    if cfg.arch == "gemma":  # (1 + w) RMSNorms, GeGLU, tied head, head_dim != hidden / heads
        config = T.GemmaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden,
                               intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                               num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                               head_dim=2 * cfg.hidden // cfg.heads,
                               max_position_embeddings=max(128, cfg.seq_len), pad_token_id=0,
                               bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
        config.architectures = ["GemmaForCausalLM"]
        return T.GemmaForCausalLM(config)
    if cfg.arch == "gpt2":  # pre-LN, learned positions, Conv1D, tied head
        config = T.GPT2Config(vocab_size=vocab_size, n_embd=cfg.hidden, n_layer=cfg.layers,
                              n_head=cfg.heads, n_inner=cfg.intermediate,
                              n_positions=max(128, cfg.seq_len), bos_token_id=2, eos_token_id=3,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config.architectures = ["GPT2LMHeadModel"]
        return T.GPT2LMHeadModel(config)
    config = T.LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden,
                           intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                           num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                           max_position_embeddings=max(128, cfg.seq_len), pad_token_id=0,
                           bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    return T.LlamaForCausalLM(config)


def lm_batch(tokenizer, texts: List[str], arch: Arch, seq_len: int, gen: torch.Generator
             ) -> Dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    if arch == "bert":
        special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
        inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), gen)
        return {"input_ids": inputs, "attention_mask": attn, "labels": labels}
    labels = ids.masked_fill(attn == 0, -100)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def train(cfg: ZooConfig, seed: int, out: Path, tokenizer=None) -> Path:
    """Train one model and save it (with its tokenizer) to `out`."""
    texts = load_texts("shakespeare-train", cfg.train_passages or None)
    tokenizer = tokenizer or build_tokenizer(cfg.vocab, cfg.arch, texts)
    model = build_model(cfg, len(tokenizer), seed)
    gen = torch.Generator().manual_seed(seed)  # data order and masking depend on the seed
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup)
        * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"training {cfg.arch} seed {seed}", unit="step")
    for step in bar:
        idx = torch.randint(len(texts), (cfg.batch,), generator=gen).tolist()
        batch = lm_batch(tokenizer, [texts[i] for i in idx], cfg.arch, cfg.seq_len, gen)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    LOG.info("trained %s seed %d: final batch loss %.3f -> %s", cfg.arch, seed, loss.item(), out)
    return out


def train_pair(cfg: ZooConfig, seeds, root: Path) -> List[Path]:
    """Train (or reuse, if already complete) one model per seed under root/{arch}-seed{N}."""
    texts = load_texts("shakespeare-train", cfg.train_passages or None)
    tokenizer = build_tokenizer(cfg.vocab, cfg.arch, texts)
    paths = []
    for seed in seeds:
        path = root / f"{cfg.arch}-seed{seed}"
        stamp = path / "zoo.json"
        if not (stamp.is_file() and stamp.read_text() == cfg.model_dump_json()):
            train(cfg, seed, path, tokenizer)
            stamp.write_text(cfg.model_dump_json())
        paths.append(path)
    return paths
