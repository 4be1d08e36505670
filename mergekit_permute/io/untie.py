"""`untie`: a copy of a tied-embedding model whose output head is its own tensor.

A rotation of the residual stream is function-preserving only when every norm's gain can be
folded into the weights that read it. The final norm's readers are the output head, and a head
tied to the embeddings cannot take the gain without changing the embeddings too. A copy whose
head starts as the embeddings (same values, `tie_word_embeddings: false`) computes exactly the
same function and admits the rotation; it costs one vocabulary x hidden tensor more. Untie both
models of a pair; the copies then align and merge like any untied model.
"""

import json
import logging
import math
from pathlib import Path
from typing import Dict, Optional

from mergekit_permute.io.checkpoints import CheckpointSource, write_like
from mergekit_permute.io.models import load_config, open_checkpoint
from mergekit_permute.io.outputs import atomic_dir, check_output, check_space
from mergekit_permute.io.preflight import PreflightError, checkpoint_bytes
from mergekit_permute.spec import PermutationSpec, spec_for_config

LOG = logging.getLogger(__name__)
UNTIED_FILE = "untied.json"


def tied_heads(spec: PermutationSpec) -> Dict[str, str]:
    """head -> embeddings, for the tied weights that read the final norm's output."""
    readers = {r for fold in spec.norm_folds for r in fold.readers}
    return {w.name: w.tied_to for w in spec.weights if w.tied_to and w.name in readers}


def untied_record(path: str) -> Optional[Dict]:
    """What `untie` wrote beside a model (None for any other model)."""
    record = Path(path) / UNTIED_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def untie(checkpoint: str, out, overwrite: bool = False, allow_unsafe_pickle: bool = False) -> Path:
    config = load_config(checkpoint)
    spec = spec_for_config(config)
    heads = tied_heads(spec)
    if not heads:
        raise PreflightError(f"{checkpoint}: {spec.architecture} has no output head tied to the "
                             "embeddings behind a foldable norm; there is nothing to untie")
    untied_config = config.__class__.from_dict({**config.to_dict(), "tie_word_embeddings": False})
    error = spec_for_config(untied_config).orthogonal_residual_error()
    if error:
        raise PreflightError(f"{checkpoint}: untying the head would not admit a residual "
                             f"rotation ({error}); keep the model tied")
    out = check_output(out, overwrite, [("checkpoint", checkpoint)])
    source = open_checkpoint(checkpoint, spec, allow_unsafe_pickle)
    reader = CheckpointSource(source, spec)
    rules = spec.weight_map()
    stored = set(source.keys())
    copies = {head: reader.key(embeddings) for head, embeddings in heads.items()   # tied:
              if not stored.intersection((head, *rules[head].aliases))}        # not stored
    check_space(out, checkpoint_bytes(source) + sum(
        math.prod(source.meta(key)[0]) * source.meta(key)[1].itemsize for key in copies.values()))
    with atomic_dir(out, overwrite) as tmp:
        write_like(source, tmp, lambda _, t: t, desc="untying", copies=copies)
        config_path = tmp / "config.json"
        doc = json.loads(config_path.read_text())
        doc["tie_word_embeddings"] = False
        config_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        (tmp / UNTIED_FILE).write_text(json.dumps(
            {"source": str(source.root.resolve()) if Path(checkpoint).expanduser().exists()
             else str(checkpoint), "heads": heads,
             "note": "output head copied from the embeddings; tie_word_embeddings set to false "
                     "(same function, one vocabulary x hidden tensor more)"}, indent=2) + "\n")
    LOG.info("untied %s -> %s (%s)", checkpoint, out, ", ".join(f"{h} from {e}"
                                                                for h, e in heads.items()))
    return out

