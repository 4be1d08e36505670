"""Text -> token batches, one way for calibration, evaluation and learning: rows cut before the
tokenizer sees them, padded batches of the model's own inputs, and the labels of a loss (next
tokens, fixed-seed masked tokens, or classes)."""

import inspect
from typing import Dict, List, Literal, Optional, Sequence

import torch
import transformers

from mergekit_permute.io.data import clip_texts

Objective = Literal["mlm", "clm", "cls"]


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # pads after the text: left pads (Llama's and Gemma's tokenizers' default) would shift the
    # positions of every short row and give its first token a label predicted from a pad
    tokenizer.padding_side = "right"
    return tokenizer


def model_inputs(batch: Dict[str, torch.Tensor], architecture: Optional[str] = None
                 ) -> Dict[str, torch.Tensor]:
    """Drop tokenizer outputs the model's forward does not take (e.g. token_type_ids)."""
    if architecture is None or "token_type_ids" not in batch:
        return batch
    forward = getattr(transformers, architecture).forward
    if "token_type_ids" not in inspect.signature(forward).parameters:
        batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int,
                gen: torch.Generator, prob: float = 0.15, low: int = 5):
    """BERT masking (80% [MASK], 10% random, 10% kept) -> (inputs, labels with -100 elsewhere).
    Random tokens are drawn from [low, vocab) (the zoo tokenizers' special tokens lie below)."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=gen) < prob) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=gen)
    inputs[chosen & (roll < 0.8)] = mask_id
    rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand_pos] = torch.randint(low, vocab, input_ids.shape, generator=gen)[rand_pos]
    return inputs, labels


def mask_rows(input_ids: torch.Tensor, attention: torch.Tensor, special: torch.Tensor,
              mask_id: int, vocab: int, seed: int, first_row: int):
    """mask_tokens row by row, each row's draws from its own generator (the seed and the row's
    index in the text) over its own tokens: the masks depend on the seed and the text only,
    not on which rows share a padded batch (--batch-size)."""
    inputs, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    for r in range(input_ids.shape[0]):
        n = int(attention[r].sum())   # right padding (prepare_tokenizer): the row's tokens
        gen = torch.Generator().manual_seed((seed * 1_000_003 + first_row + r) % (1 << 63))
        inputs[r, :n], labels[r, :n] = mask_tokens(input_ids[r, :n], special[r, :n], mask_id,
                                                   vocab, gen)
    return inputs, labels


def tokenize(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
             architecture: Optional[str] = None, objective: Optional[Objective] = None,
             seed: int = 0, labels: Sequence = ()) -> List[Dict[str, torch.Tensor]]:
    """Batches of at most `max_length` tokens a row; with an `objective`, with its labels
    (MLM: the same masked positions for a given seed, whatever is evaluated on them)."""
    prepare_tokenizer(tokenizer)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = dict(tokenizer(clip_texts(texts[i:i + batch_size], max_length), padding=True,
                             truncation=True, max_length=max_length, return_tensors="pt"))
        ids, attn = enc["input_ids"], enc["attention_mask"]
        if objective == "mlm":
            special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (attn == 0)
            enc["input_ids"], enc["labels"] = mask_rows(ids, attn, special,
                                                        tokenizer.mask_token_id, len(tokenizer),
                                                        seed, i)
        elif objective == "clm":
            enc["labels"] = ids.masked_fill(attn == 0, -100)
        elif objective == "cls":
            enc["labels"] = torch.tensor(list(labels[i:i + batch_size]))
        batches.append(model_inputs(enc, architecture))
    return batches
