"""`mergekit-permute align | merge | barrier | demo`."""

import logging
import sys
from pathlib import Path

import click


LOG = logging.getLogger("mergekit_permute")
ATTENTION = ["head_perm", "monotonic", "identity", "ignore_heads"]
RESIDUAL = ["all", "first", "last", "identity", "orthogonal", "auto"]
QK = ["follow_vo", "separate", "joint"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergekit_permute").setLevel(logging.INFO)


class UserError(click.ClickException):
    """A clear message and exit status 2, no traceback."""
    exit_code = 2


def _friendly(fn):
    """Turn our validation errors into UserError (message + exit 2)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, ValidationError) as e:
            raise UserError(str(e)) from e
    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="More logging.")
def main(verbose: bool) -> None:
    """Align and merge Transformers trained from different initializations."""
    _setup_logging(verbose)


def _allow_pickle(ctx, param, value):
    if value:
        import os

        from mergekit_permute.models import ALLOW_PICKLE_ENV
        os.environ[ALLOW_PICKLE_ENV] = "1"


def align_options(f):
    for opt in reversed([
        click.option("--attention", type=click.Choice(ATTENTION), default="head_perm",
                     show_default=True, help="Attention matching (ignore_heads: ablation, not "
                     "function-preserving)."),
        click.option("--ffn", type=click.Choice(["permute", "identity"]), default="permute",
                     show_default=True),
        click.option("--residual", type=click.Choice(RESIDUAL), default="auto", show_default=True,
                     help="Residual-stream policy (auto: orthogonal for pre-norm models with an "
                     "untied head, else all)."),
        click.option("--matching", type=click.Choice(["activations", "weights"]),
                     default="activations", show_default=True,
                     help="activations: correlate features on calibration text (the paper); "
                     "weights: data-free weight matching (Git Re-Basin)."),
        click.option("--vo", type=click.Choice(["permute", "orthogonal"]), default="permute",
                     show_default=True, help="V/O dims inside a head: permuted (paper) or "
                     "rotated per KV group (Procrustes; separate V/O projections only)."),
        click.option("--qk", type=click.Choice(QK), default="follow_vo", show_default=True,
                     help="Q/K dims inside a head: follow V's permutation (paper), or match them "
                     "on query/key features (separate), also when assigning heads (joint)."),
        click.option("--samples", type=int, default=256, show_default=True,
                     help="Calibration passages."),
        click.option("--max-length", type=int, default=128, show_default=True),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--drop-special-tokens", is_flag=True,
                     help="Leave [CLS]/[SEP]/BOS... out of the statistics."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1..."),
        click.option("--no-cache", is_flag=True, help="Recompute calibration statistics."),
        click.option("--allow-unsafe-pickle", is_flag=True, callback=_allow_pickle,
                     expose_value=False, help="Fully unpickle .bin checkpoints that the "
                     "weights-only unpickler rejects (runs their code: trusted sources only)."),
    ]):
        f = opt(f)
    return f


def _settings(matching, attention, ffn, residual, qk, vo, samples, max_length, batch_size,
              drop_special_tokens):
    from mergekit_permute.align import AlignSettings
    return AlignSettings(matching=matching, attention=attention, ffn=ffn, residual=residual,
                         qk=qk, vo=vo, samples=samples,
                         max_length=max_length, batch_size=batch_size,
                         keep_special_tokens=not drop_special_tokens)


@main.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--data", help=".txt (one passage per line), .jsonl with 'text', a dataset id, or "
              "shakespeare-calib (shipped); not needed with --matching weights.")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--permutations-only", is_flag=True,
              help="Write permutations.safetensors + alignment.json, not the model.")
@click.option("--overwrite", is_flag=True)
@align_options
@_friendly
def align(model_a, model_b, data, out, permutations_only, overwrite, device, no_cache, **kw):
    """Write MODEL_B permuted into MODEL_A's basis (same function) to --out."""
    from mergekit_permute.align import align_pair, save_alignment
    from mergekit_permute.outputs import atomic_dir, check_output_dir
    from mergekit_permute.permute import apply_to_model

    settings = _settings(**kw)
    if data is None and settings.matching == "activations":
        raise UserError("--data is required: activation matching correlates the models' "
                        "features on calibration text (or pass --matching weights for data-free "
                        "weight matching)")
    if not settings.function_preserving:
        raise UserError("attention=ignore_heads is not function-preserving, so `align` refuses "
                        "it; use it only as an ablation in `barrier` or a merge")
    check_output_dir(out, overwrite)
    alignment, _, model_b_loaded, tok = align_pair(model_a, model_b, data, settings,
                                                   device=device, use_cache=not no_cache)
    with atomic_dir(out, overwrite) as tmp:
        if not permutations_only:
            apply_to_model(alignment.spec, model_b_loaded, alignment.transforms, alignment.fold_b)
            model_b_loaded.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        save_alignment(alignment, tmp)
    _print_summary(alignment)
    click.echo(f"wrote {out}")


def _print_summary(alignment) -> None:
    from mergekit_permute.align import summarize
    click.echo(f"{'space':<10} {'corr before':>12} {'corr after':>11}")
    for kind, row in summarize(alignment.report).items():
        click.echo(f"{kind:<10} {row['mean_corr_before']:>12.4f} {row['mean_corr_after']:>11.4f}")


@main.command()
@click.argument("alignment", type=click.Path(exists=True, path_type=Path))
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@_friendly
def apply(alignment, checkpoint, out, overwrite):
    """Apply a saved alignment (a directory from `align`, or its permutations.safetensors) to
    CHECKPOINT, e.g. a later fine-tune of model B."""
    import json
    import shutil

    from mergekit_permute.align import ALIGNMENT_FILE, PERMUTATIONS_FILE, load_transforms
    from mergekit_permute.models import load_model, load_tokenizer
    from mergekit_permute.outputs import atomic_dir, check_output_dir
    from mergekit_permute.permute import apply_to_model, check_transforms, fold_scales
    from mergekit_permute.spec import spec_for_config

    check_output_dir(out, overwrite)
    folder = alignment if alignment.is_dir() else alignment.parent
    perms = alignment / PERMUTATIONS_FILE if alignment.is_dir() else alignment
    info_path = folder / ALIGNMENT_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    transforms = load_transforms(perms)
    model = load_model(checkpoint)
    spec = spec_for_config(model.config)
    if info.get("architecture") not in (None, spec.architecture):
        raise UserError(f"the alignment was made for {info['architecture']}, but {checkpoint} is "
                        f"{spec.architecture}")
    check_transforms(spec, transforms)
    folds = fold_scales(spec, model.state_dict()) if info.get("folded_norms") else None
    apply_to_model(spec, model, transforms, folds)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(checkpoint).save_pretrained(tmp)
        shutil.copy(perms, tmp / PERMUTATIONS_FILE)
        if info:
            (tmp / ALIGNMENT_FILE).write_text(json.dumps({**info, "applied_to": checkpoint},
                                                         indent=2) + "\n")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True)
@_friendly
def merge(recipe, out, device, overwrite):
    """Run a MergeKit recipe (any method; `permute` included) with an atomic output."""
    from mergekit_permute.merging import run_recipe
    run_recipe(recipe, out, device=device, overwrite=overwrite)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--data", "eval_data", required=True,
              help="Evaluation text (.txt/.jsonl/dataset id; .jsonl with text+label for classifiers).")
@click.option("--calibration", default="shakespeare-calib", show_default=True,
              help="Calibration text for the alignment.")
@click.option("--methods", default="vanilla,default", show_default=True,
              help="Comma-separated: vanilla, ffn_only, head_perm, monotonic, ignore_heads, "
              "default, combined with '+', e.g. head_perm+residual=all.")
@click.option("--lambdas", type=int, default=21, show_default=True)
@click.option("--eval-samples", type=int, default=256, show_default=True)
@click.option("--eval-max-length", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Masking seed (MLM).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@align_options
@_friendly
def barrier(models, eval_data, calibration, methods, lambdas, eval_samples,
            eval_max_length, seed, out, overwrite, device, no_cache, **kw):
    """Measure the loss barrier between MODEL_A and MODEL_B for several alignment methods.

    With three or more MODELS: the loss of the N-model merge (all aligned to the first) for
    each method, against each parent and the vanilla N-average."""
    from mergekit_permute.barrier import run_barrier, write_report
    from mergekit_permute.card import barrier_table
    from mergekit_permute.outputs import atomic_dir, check_output_dir

    if len(models) < 2:
        raise UserError("barrier needs at least two models")
    if lambdas < 3:
        raise UserError("--lambdas must be at least 3 (the endpoints and one point between)")
    check_output_dir(out, overwrite)
    if len(models) > 2:
        import json

        from mergekit_permute.barrier import multi_table, run_multi
        result = run_multi(models, eval_data=eval_data, calibration=calibration,
                           methods=[m for m in methods.split(",") if m.strip()],
                           settings=_settings(**kw), eval_samples=eval_samples,
                           eval_max_length=eval_max_length, seed=seed, device=device,
                           use_cache=not no_cache)
        with atomic_dir(out, overwrite) as tmp:
            (tmp / "merge.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "merge.md").write_text(multi_table(result) + "\n")
        click.echo(multi_table(result))
        return
    model_a, model_b = models
    result = run_barrier(model_a, model_b, eval_data=eval_data, calibration=calibration,
                         methods=[m for m in methods.split(",") if m.strip()], lambdas=lambdas,
                         settings=_settings(**kw), eval_samples=eval_samples,
                         eval_max_length=eval_max_length, seed=seed, device=device,
                         use_cache=not no_cache)
    with atomic_dir(out, overwrite) as tmp:
        write_report(result, tmp)
    click.echo(barrier_table(result))
    click.echo(f"wrote {out}/barrier.json, barrier.md, barrier.png")


@main.command()
@click.option("--out", default="demo-output", show_default=True, type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "bert"]), default="llama", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny models (CI-sized), same code path.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Models are trained from seeds SEED and SEED+1.")
@click.option("--overwrite", is_flag=True, help="Replace an existing merged model in --out.")
@_friendly
def demo(out, arch, quick, seed, overwrite):
    """Train two small models from different seeds, measure the barrier, merge. No download."""
    from mergekit_permute.card import barrier_table
    from mergekit_permute.demo import run_demo

    result = run_demo(out, arch=arch, size="quick" if quick else "full", seeds=(seed, seed + 1),
                      overwrite=overwrite)
    click.echo(barrier_table(result))
    default = result["methods"]["default"]
    if "removed_vs_vanilla" in default:
        click.echo(f"\nThe default alignment removed {100 * default['removed_vs_vanilla']:.0f}% "
                   "of the vanilla loss barrier.")
    click.echo(f"wrote {out}/barrier.png, barrier.md, barrier.json, merged/ "
               f"({result['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
