"""Checks of a MergeKit recipe that `permute` adds before any work, for our `merge` command
and for stock `mergekit-yaml` alike: keys MergeKit would ignore, and an output that would
touch an input."""

import difflib
from pathlib import Path
from typing import Dict

import yaml
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.tokenizer.config import TokenEmbeddingConfig, TokenizerConfig
from pydantic import ValidationError

from mergekit_permute.calibration.cache import cache_dir
from mergekit_permute.io.outputs import check_overlap
from mergekit_permute.settings import DATA_PARAM, RecipeError


def raw_recipe(path: Path) -> Dict:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a MergeKit recipe is a YAML mapping")
    return raw


def _unknown(keys, known, where: str) -> None:
    unknown = sorted(str(k) for k in set(keys) - set(known))
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
        raise RecipeError(f"{where}: unknown key(s) {unknown} (MergeKit would ignore them"
                          f"{'; ' + hints if hints else ''}); known: {sorted(known)}")


def check_recipe_keys(raw: Dict, path) -> None:
    """MergeKit ignores keys it does not know; a `permute` recipe refuses them (a misspelt
    `parameters:` would run silently on the defaults)."""
    if raw.get("merge_method") != "permute":
        return
    _unknown(raw, MergeConfiguration.model_fields, f"{path}")
    for entry in raw.get("models") or []:
        if isinstance(entry, dict):
            _unknown(entry, InputModelDefinition.model_fields, f"{path}: models entry")
    tokenizer = raw.get("tokenizer")
    if isinstance(tokenizer, dict):
        _unknown(tokenizer, TokenizerConfig.model_fields, f"{path}: tokenizer")
        for token, entry in (tokenizer.get("tokens") or {}).items():
            if isinstance(entry, dict):
                _unknown(entry, TokenEmbeddingConfig.model_fields,
                         f"{path}: tokenizer.tokens.{token}")


def recipe_inputs(path: Path, config):
    """Everything a recipe reads: the recipe, its models, its calibration text, the cache."""
    inputs = [("recipe", str(path)), *(("model", ref.model.path)
                                       for ref in config.referenced_models())]
    if config.merge_method == "permute":
        inputs += [("calibration data", (config.parameters or {}).get(DATA_PARAM)),
                   ("statistics cache", str(cache_dir()))]
    return inputs


def preflight_yaml(config_file: str, out_path: str) -> None:
    """`mergekit-yaml` on a `permute` recipe: its keys, and an output that never touches an
    input (MergeKit itself writes into any directory)."""
    path = Path(config_file)
    try:
        raw = raw_recipe(path)
    except (ValueError, OSError):
        return   # MergeKit's own error
    if raw.get("merge_method") != "permute":
        return
    check_recipe_keys(raw, path)
    try:
        config = MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, TypeError):
        return
    try:
        check_overlap(Path(out_path), recipe_inputs(path, config))
    except ValueError as e:
        raise RecipeError(str(e)) from None
