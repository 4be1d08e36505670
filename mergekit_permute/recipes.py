"""Running a MergeKit recipe from our CLI: safe YAML, validation before any work, an atomic
output directory whose card carries its final name."""

from pathlib import Path
from typing import Dict, Optional

import yaml


def load_recipe(path: Path):
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a MergeKit recipe is a YAML mapping")
    try:
        return MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: not a valid MergeKit recipe: {e}") from None


def check_architectures(config, path: Path) -> None:
    """MergeKit merges one architecture at a time; say so before any work."""
    from mergekit_permute.models import load_config
    found: Dict[str, str] = {}
    for ref in config.referenced_models():
        archs = getattr(load_config(ref.model.path), "architectures", None) or ["?"]
        found.setdefault(archs[0], ref.model.path)
    if len(found) > 1:
        listing = ", ".join(f"{arch} ({model})" for arch, model in found.items())
        raise ValueError(f"{path}: the recipe mixes architectures: {listing}. A merge needs "
                         "models of one architecture")


def estimated_bytes(config) -> int:
    """The merge's size: the base model's (or the first model's) weights."""
    from mergekit_permute.checkpoints import Checkpoint
    from mergekit_permute.preflight import checkpoint_bytes
    ref = config.base_model or config.referenced_models()[0]
    try:
        return checkpoint_bytes(Checkpoint(ref.model.path))
    except (ValueError, OSError):
        return 0


def run_recipe(path: Path, out: Path, *, device: str = "cpu", overwrite: bool = False,
               barrier: Optional[Dict] = None) -> None:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_permute.mergekit import install
    from mergekit_permute.mergekit.run import PermuteRun
    from mergekit_permute.outputs import atomic_dir

    from mergekit_permute.preflight import check_device, check_output
    install()
    out = Path(out)
    check_device(device)
    check_output(out, overwrite)
    config = load_recipe(path)
    for ref in config.referenced_models():
        p = ref.model.path
        if p.startswith(("/", ".", "~")) and not Path(p).expanduser().exists():
            raise FileNotFoundError(f"{path}: model {p!r} does not exist")
    check_architectures(config, path)
    check_output(out, overwrite, estimated_bytes(config))
    if config.merge_method == "permute":
        run = PermuteRun(config, device).attach()      # validates the recipe now
        run.output_name, run.barrier = out.name, barrier
    source = Path(path).read_text(encoding="utf-8")
    with atomic_dir(out, overwrite) as tmp:
        run_merge(config, str(tmp), options=MergeOptions(device=device, quiet=False),
                  config_source=source)
        card = tmp / "README.md"
        if card.is_file() and config.merge_method != "permute":
            # MergeKit titles its card with the directory it wrote into: ours is temporary.
            text = card.read_text(encoding="utf-8")
            card.write_text(text.replace(f"\n# {tmp.name}\n", f"\n# {out.name}\n", 1),
                            encoding="utf-8")
