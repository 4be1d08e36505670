"""BERT family (post-LN encoder): BERT and RoBERTa bare encoders, masked-LM, pre-training
(MultiBERTs) and sequence-classification heads.

The residual permutation R reaches every LayerNorm, the position and token-type embeddings,
the pooler's input and - because the MLM decoder is tied to the word embeddings - BOTH axes of
the MLM head's transform.dense and its LayerNorm. The pooler's output, the NSP head and the
classifier's labels are never permuted.
"""

from typing import List

from mergekit_permute.spec._build import (
    RESIDUAL, inp, inputs_of, layer_norm, linear, out, outputs_of, w,
)
from mergekit_permute.spec.base import HeadLayout, PermutationSpec, Space, WeightRule

NOTES = {
    "BertModel": "bare encoder: residual stays identity (it is the output); pooler reads R",
    "BertForMaskedLM": "tied decoder: MLM transform.dense permuted on both axes by R; a "
                       "shipped (unused) pooler and NSP head carried along",
    "BertForPreTraining": "MultiBERTs; as MaskedLM plus pooler + NSP head (never permuted)",
    "BertForSequenceClassification": "pooler reads R; classifier labels never permuted",
    "RobertaModel": "as BertModel",
    "RobertaForMaskedLM": "tied decoder: lm_head.dense permuted on both axes by R",
    "RobertaForSequenceClassification": "classifier.dense reads R; labels never permuted",
}
MODEL_TYPES = {arch: "roberta" if arch.startswith("Roberta") else "bert" for arch in NOTES}
PREFIX = {"BertModel": "", "BertForMaskedLM": "bert.", "BertForPreTraining": "bert.",
          "BertForSequenceClassification": "bert.", "RobertaModel": "",
          "RobertaForMaskedLM": "roberta.", "RobertaForSequenceClassification": "roberta."}
# Masked-LM head: (transform dense, transform norm, decoder, output bias)
MLM_HEAD = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                     "cls.predictions.decoder", "cls.predictions.bias"),
            "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias")}


def build(config, architecture: str) -> PermutationSpec:
    p = PREFIX[architecture]
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = hidden // heads
    n_layers = config.num_hidden_layers

    residual_points = [outputs_of(f"{p}embeddings.LayerNorm")]
    spaces: List[Space] = []
    weights: List[WeightRule] = [
        w(f"{p}embeddings.word_embeddings.weight", (config.vocab_size, hidden), None,
          out(RESIDUAL), vocab_axis=0),
        w(f"{p}embeddings.position_embeddings.weight", (config.max_position_embeddings, hidden),
          None, out(RESIDUAL)),
        w(f"{p}embeddings.token_type_embeddings.weight", (config.type_vocab_size, hidden),
          None, out(RESIDUAL)),
        *layer_norm(f"{p}embeddings.LayerNorm", hidden, RESIDUAL, bias=True, legacy=True),
    ]
    for i in range(n_layers):
        L = f"{p}encoder.layer.{i}"
        attn, ffn = f"attn.{i}", f"ffn.{i}"
        spaces += [
            Space(name=attn, kind="attention", size=hidden, layer=i,
                  heads=HeadLayout(num_heads=heads, num_kv_heads=heads, head_dim=head_dim),
                  features=(inputs_of(f"{L}.attention.output.dense"),)),
            Space(name=ffn, kind="ffn", size=inter, layer=i,
                  features=(inputs_of(f"{L}.output.dense"),)),
        ]
        residual_points += [outputs_of(f"{L}.attention.output.LayerNorm"),
                            outputs_of(f"{L}.output.LayerNorm")]
        for proj, view in (("query", "q"), ("key", "k"), ("value", "v")):
            weights += linear(f"{L}.attention.self.{proj}", hidden, hidden, out(attn, view),
                              inp(RESIDUAL), bias=True, layer=i)
        weights += linear(f"{L}.attention.output.dense", hidden, hidden, out(RESIDUAL),
                          inp(attn, "o"), bias=True, layer=i)
        weights += layer_norm(f"{L}.attention.output.LayerNorm", hidden, RESIDUAL, bias=True,
                              layer=i, legacy=True)
        weights += linear(f"{L}.intermediate.dense", inter, hidden, out(ffn), inp(RESIDUAL),
                          bias=True, layer=i)
        weights += linear(f"{L}.output.dense", hidden, inter, out(RESIDUAL), inp(ffn),
                          bias=True, layer=i)
        weights += layer_norm(f"{L}.output.LayerNorm", hidden, RESIDUAL, bias=True, layer=i,
                              legacy=True)

    family = "roberta" if architecture.startswith("Roberta") else "bert"
    if architecture in ("BertModel", "RobertaModel", "BertForPreTraining",
                        "BertForSequenceClassification"):
        weights += linear(f"{p}pooler.dense", hidden, hidden, None, inp(RESIDUAL), bias=True)
    elif architecture.endswith("ForMaskedLM"):
        # Pretraining checkpoints published as MLMs (bert-base-uncased ...) still ship the
        # pooler and the next-sentence head, which the MLM class ignores.
        weights += [r.model_copy(update={"optional": True}) for r in
                    linear(f"{p}pooler.dense", hidden, hidden, None, inp(RESIDUAL), bias=True)]
        if family == "bert":
            weights += [r.model_copy(update={"optional": True}) for r in
                        linear("cls.seq_relationship", 2, hidden, None, None, bias=True)]
    if architecture.endswith(("ForMaskedLM", "ForPreTraining")):
        dense, norm, decoder, bias = MLM_HEAD[family]
        # The decoder is tied to the word embeddings, so its input axis carries R; the
        # transform feeding it must therefore write R as well as read it.
        weights += linear(dense, hidden, hidden, out(RESIDUAL), inp(RESIDUAL), bias=True)
        weights += layer_norm(norm, hidden, RESIDUAL, bias=True, legacy=True)
        weights += [
            w(f"{decoder}.weight", (config.vocab_size, hidden), None, inp(RESIDUAL),
              tied_to=f"{p}embeddings.word_embeddings.weight", vocab_axis=0),
            w(bias, (config.vocab_size,), None, vocab_axis=0),
            w(f"{decoder}.bias", (config.vocab_size,), None, tied_to=bias, vocab_axis=0),
        ]
    if architecture == "BertForPreTraining":
        weights += linear("cls.seq_relationship", 2, hidden, None, None, bias=True)
    if architecture == "BertForSequenceClassification":
        weights += linear("classifier", config.num_labels, hidden, None, None, bias=True)
    if architecture == "RobertaForSequenceClassification":
        weights += linear("classifier.dense", hidden, hidden, None, inp(RESIDUAL), bias=True)
        weights += linear("classifier.out_proj", config.num_labels, hidden, None, None, bias=True)

    spaces.insert(0, Space(name=RESIDUAL, kind="residual", size=hidden,
                           features=tuple(residual_points),
                           frozen=architecture in ("BertModel", "RobertaModel")))
    return PermutationSpec(family=family, architecture=architecture, spaces=tuple(spaces),
                           weights=tuple(weights), num_layers=n_layers,
                           blocks=f"{p}encoder.layer")
