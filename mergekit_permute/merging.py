"""Running a MergeKit recipe from our CLI: safe YAML, early validation, atomic output."""

from pathlib import Path

import yaml


def load_recipe(path: Path):
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a MergeKit recipe is a YAML mapping")
    try:
        return MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid MergeKit recipe: {e}") from None


def run_recipe(path: Path, out: Path, *, device: str = "cpu", overwrite: bool = False) -> None:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_permute.mergekit_hooks import install
    from mergekit_permute.method import validate_recipe
    from mergekit_permute.outputs import atomic_dir, check_output_dir

    install()
    check_output_dir(out, overwrite)
    config = load_recipe(path)
    validate_recipe(config)
    for ref in config.referenced_models():
        p = ref.model.path
        if p.startswith(("/", ".", "~")) and not Path(p).expanduser().exists():
            raise FileNotFoundError(f"{path}: model {p!r} does not exist")
    source = Path(path).read_text(encoding="utf-8")
    with atomic_dir(out, overwrite) as tmp:
        run_merge(config, str(tmp), options=MergeOptions(device=device, quiet=False),
                  config_source=source)
