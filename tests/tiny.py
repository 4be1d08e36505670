"""Tiny configs of every supported architecture, built offline with the real transformers classes."""

import torch
import transformers as T

BERT = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)
LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "BertForMaskedLM": lambda: T.BertConfig(**BERT),
    "BertForPreTraining": lambda: T.BertConfig(**BERT),
    "BertModel": lambda: T.BertConfig(**BERT),
    "BertForSequenceClassification": lambda: T.BertConfig(**BERT, num_labels=3),
    "LlamaForCausalLM": lambda: T.LlamaConfig(**LLAMA, tie_word_embeddings=False),
    "LlamaForCausalLM-tied": lambda: T.LlamaConfig(**LLAMA, tie_word_embeddings=True),
    "LlamaForCausalLM-mha": lambda: T.LlamaConfig(**{**LLAMA, "num_key_value_heads": 8}),
    "MistralForCausalLM": lambda: T.MistralConfig(**LLAMA),
    "Qwen2ForCausalLM": lambda: T.Qwen2Config(**LLAMA, tie_word_embeddings=True),
    "GPT2LMHeadModel-untied": lambda: T.GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=2,
                                                   n_positions=40, tie_word_embeddings=False),
    "Qwen3ForCausalLM": lambda: T.Qwen3Config(**LLAMA, head_dim=8),
    "RobertaForMaskedLM": lambda: T.RobertaConfig(**{**BERT, "max_position_embeddings": 48}),
    "RobertaModel": lambda: T.RobertaConfig(**{**BERT, "max_position_embeddings": 48}),
    "RobertaForSequenceClassification": lambda: T.RobertaConfig(
        **{**BERT, "max_position_embeddings": 48}, num_labels=2),
    "GPT2LMHeadModel": lambda: T.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=40, bos_token_id=0, eos_token_id=0),
    "GPTNeoXForCausalLM": lambda: T.GPTNeoXConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, rotary_pct=0.5),
    "GPTNeoXForCausalLM-sequential": lambda: T.GPTNeoXConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, rotary_pct=0.25,
        use_parallel_residual=False),
    "Phi3ForCausalLM": lambda: T.Phi3Config(**LLAMA, pad_token_id=0, eos_token_id=1,
                                            partial_rotary_factor=0.5),
    "Phi3ForCausalLM-tied": lambda: T.Phi3Config(**LLAMA, pad_token_id=0, eos_token_id=1,
                                                 tie_word_embeddings=True),
    "GemmaForCausalLM": lambda: T.GemmaConfig(**{**LLAMA, "num_key_value_heads": 1}, head_dim=8),
    "GemmaForCausalLM-untied": lambda: T.GemmaConfig(**LLAMA, head_dim=8,
                                                     tie_word_embeddings=False),
    "Gemma2ForCausalLM": lambda: T.Gemma2Config(**LLAMA, head_dim=8, query_pre_attn_scalar=8,
                                                sliding_window=4, attn_logit_softcapping=2.0,
                                                final_logit_softcapping=3.0),
    # config variants the specs claim: biases, head_dim != hidden / heads, odd partial rotary,
    # GPT-2's attention scaling options
    "LlamaForCausalLM-biases": lambda: T.LlamaConfig(**LLAMA, attention_bias=True, mlp_bias=True,
                                                     head_dim=6, tie_word_embeddings=False),
    "Qwen3ForCausalLM-bias": lambda: T.Qwen3Config(**LLAMA, head_dim=8, attention_bias=True),
    "GemmaForCausalLM-bias": lambda: T.GemmaConfig(**LLAMA, head_dim=8, attention_bias=True,
                                                   tie_word_embeddings=False),
    "Phi3ForCausalLM-odd-rotary": lambda: T.Phi3Config(
        **{**LLAMA, "num_attention_heads": 4}, pad_token_id=0, eos_token_id=1,
        partial_rotary_factor=0.375),
    "GPT2LMHeadModel-scaled": lambda: T.GPT2Config(
        vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=40, tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}


def build(name: str, seed: int = 0):
    arch = name.split("-")[0]
    config = CONFIGS[name]()
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(T, arch)(config).eval()
    # Non-trivial norm gains and biases so a wrong permutation of them is visible.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(model, batch: int = 3, length: int = 11, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if model.config.model_type in ("bert", "roberta"):
        kw["token_type_ids"] = (torch.arange(length) > length // 2).long().expand(batch, -1)
    return kw


def outputs(model, kw):
    with torch.no_grad():
        out = model(**kw)
    if hasattr(out, "logits"):
        return [out.logits]
    if hasattr(out, "prediction_logits"):
        return [out.prediction_logits, out.seq_relationship_logits]
    return [out.last_hidden_state, out.pooler_output]
