"""`mergekit-permute align | apply | merge | barrier | untie | demo`."""

import functools
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import click
from pydantic import ValidationError

from mergekit_permute.align.pipeline import align as run_align
from mergekit_permute.barrier import multi_table, run_barrier, run_multi, write_report
from mergekit_permute.calibration.cache import cache_dir
from mergekit_permute.calibration.dist import init_from_env
from mergekit_permute.calibration.heap import own_heap
from mergekit_permute.calibration.resume import checkpoint_seconds
from mergekit_permute.card import barrier_table
from mergekit_permute.core.permute import norm_gains
from mergekit_permute.core.alignment import (
    ALIGNMENT_FILE, PERMUTATIONS_FILE, load_alignment, locate, save_alignment, summarize,
)
from mergekit_permute.demo import run_demo
from mergekit_permute.evaluate import Evaluation
from mergekit_permute.io.checkpoints import Checkpoint, CheckpointSource, dtype_of, write_like
from mergekit_permute.io.fidelity import fidelity, require_function
from mergekit_permute.io.models import load_config, open_checkpoint, open_pair
from mergekit_permute.io.outputs import atomic_dir, check_output, check_space, follow_umask
from mergekit_permute.io.preflight import alignment_bytes, check_device, checkpoint_bytes
from mergekit_permute.io.untie import untie as run_untie
from mergekit_permute.recipes import recipe_barrier, run_recipe
from mergekit_permute.settings import RunSettings, choices, click_options, settings_from_cli
from mergekit_permute.spec import spec_for_config

LOG = logging.getLogger("mergekit_permute")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergekit_permute").setLevel(logging.INFO)


class UserError(click.ClickException):
    """A clear message and exit status 2, no traceback."""
    exit_code = 2


class OutPath(click.Path):
    """An output directory; an empty one (an unset shell variable) is named as such, before
    click would read it as `.`, the working directory."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            raise UserError("the output path is empty (an unset shell variable?); name the "
                            "directory to write, e.g. --out merged-model")
        return super().convert(value, param, ctx)


OUT = OutPath(path_type=Path)


def _friendly(fn):
    """Turn our validation errors into UserError (message + exit 2)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, MemoryError,
                ValidationError) as e:
            raise UserError(str(e)) from e
    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="More logging.")
def main(verbose: bool) -> None:
    """Align and merge Transformers trained from different initializations."""
    _setup_logging(verbose)
    own_heap()


def common_options(f):
    f = click.option("--no-cache", is_flag=True, help="Same as --cache refresh.")(f)
    return click_options(RunSettings)(click_options()(f))


def _cache_mode(run: RunSettings, no_cache: bool) -> str:
    if no_cache and run.cache == "off":
        raise UserError("--no-cache (= --cache refresh) contradicts --cache off: pass one")
    return "refresh" if no_cache else run.cache


@main.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--data", help=".txt (one passage per line), .jsonl with 'text', a dataset id, or "
              "shakespeare-calib (shipped); not needed with --matching weights.")
@click.option("--out", required=True, type=OUT)
@click.option("--permutations-only", is_flag=True,
              help="Write permutations.safetensors + alignment.json, not the model.")
@click.option("--overwrite", is_flag=True)
@common_options
@_friendly
def align(model_a, model_b, data, out, permutations_only, overwrite, no_cache, **kw):
    """Write MODEL_B permuted into MODEL_A's basis (same function) to --out."""
    settings, run = settings_from_cli(kw), settings_from_cli(kw, RunSettings)
    cache = _cache_mode(run, no_cache)
    if data is None and settings.matching != "weights":
        raise UserError(f"--data is required: {settings.matching} matching reads the models' "
                        "features on calibration text (pass --data shakespeare-calib for the "
                        "shipped text, or --matching weights for data-free weight matching)")
    if not settings.function_preserving:
        raise UserError("attention=ignore_heads is not function-preserving, so `align` refuses "
                        "it; use it only as an ablation in `barrier` or a merge")
    check_device(run.device)
    out = check_output(out, overwrite, [
        ("model A", model_a), ("model B", model_b), ("calibration data", data),
        ("statistics cache", None if cache == "off" else str(cache_dir()))])
    checkpoint_seconds()                        # MERGEKIT_PERMUTE_CHECKPOINT_SECONDS is sane
    pair = open_pair(model_a, model_b, run.allow_unsafe_pickle)   # configs, tokenizers, weights
    written = dtype_of(run.dtype)
    check_space(out, alignment_bytes(pair.spec, settings) + (
        0 if permutations_only else checkpoint_bytes(pair.checkpoint_b, written)))
    dist = init_from_env(run.device)
    device = f"cuda:{dist.device_index}" if dist.active and run.device == "cuda" else run.device
    try:
        alignment = run_align(model_a, model_b, data, settings, pair=pair, device=device,
                              dtype=run.dtype, workers=run.workers, cache=cache, dist=dist)
    finally:
        # every collective is done: leave the group before exiting (a rank that exits with
        # gloo's threads still running aborts: "terminate called without an active exception")
        dist.close()
    if not dist.is_main:
        return
    with atomic_dir(out, overwrite) as tmp:
        if not permutations_only:
            started = time.perf_counter()
            write_like(pair.checkpoint_b, tmp, alignment.tensor, written, desc="writing aligned B")
            alignment.timings["write_seconds"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            alignment.info["function_check"] = fidelity(
                pair.spec, load_config(model_b), pair.checkpoint_b, Checkpoint(str(tmp)), device)
            require_function(alignment.info["function_check"], "aligned B")
            alignment.timings["function_check_seconds"] = round(time.perf_counter() - started, 2)
        save_alignment(alignment, tmp)
    _print_summary(alignment)
    click.echo(f"wrote {out}")


def _print_summary(alignment) -> None:
    click.echo(f"{'space':<10} {'corr before':>12} {'corr after':>11}")
    for kind, row in summarize(alignment.report).items():
        click.echo(f"{kind:<10} {row['mean_corr_before']:>12.4f} {row['mean_corr_after']:>11.4f}")


@main.command()
@click.argument("alignment", type=click.Path(exists=True, path_type=Path))
@click.argument("checkpoint")
@click.option("--out", required=True, type=OUT)
@click.option("--overwrite", is_flag=True)
@click.option("--dtype", type=click.Choice(choices("dtype", RunSettings)), default="auto",
              show_default=True, help="dtype written (auto: the checkpoint's).")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help=RunSettings.model_fields["allow_unsafe_pickle"].description)
@_friendly
def apply(alignment, checkpoint, out, overwrite, dtype, allow_unsafe_pickle):
    """Apply a saved alignment (a directory from `align`, or its permutations.safetensors) to
    CHECKPOINT, e.g. a later fine-tune of model B. Streams tensor by tensor."""
    folder, perms = locate(alignment)
    out = check_output(out, overwrite, [("alignment", str(folder)), ("checkpoint", checkpoint)])
    spec = spec_for_config(load_config(checkpoint))
    source = open_checkpoint(checkpoint, spec, allow_unsafe_pickle)
    written = dtype_of(dtype)
    check_space(out, checkpoint_bytes(source, written) + 2 * perms.stat().st_size)
    gains = norm_gains(spec, CheckpointSource(source, spec))
    aligned = load_alignment(alignment, spec, gains)       # every transform checked
    info_path = folder / (perms.stem.replace("permutations", "alignment", 1) + ".json")
    with atomic_dir(out, overwrite) as tmp:
        write_like(source, tmp, aligned.tensor, written, desc="applying")
        check = fidelity(spec, load_config(checkpoint), source, Checkpoint(str(tmp)))
        require_function(check, f"{checkpoint} with the alignment applied")
        shutil.copyfile(perms, tmp / PERMUTATIONS_FILE)
        follow_umask(tmp / PERMUTATIONS_FILE)
        if info_path.is_file():
            doc = json.loads(info_path.read_text())
            (tmp / ALIGNMENT_FILE).write_text(json.dumps({**doc, "applied_to": checkpoint,
                                                          "function_check": check},
                                                         indent=2) + "\n")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("checkpoint")
@click.option("--out", required=True, type=OUT)
@click.option("--overwrite", is_flag=True)
@click.option("--allow-unsafe-pickle", is_flag=True,
              help=RunSettings.model_fields["allow_unsafe_pickle"].description)
@_friendly
def untie(checkpoint, out, overwrite, allow_unsafe_pickle):
    """Copy a tied-embedding model (GPT-2, tied Llama) with its output head as its own tensor:
    the same function, and then the residual stream can be rotated (residual=orthogonal,
    matching=learned). Untie both models of a pair."""
    click.echo(f"wrote {run_untie(checkpoint, out, overwrite, allow_unsafe_pickle)}")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=OUT)
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--barrier", "barrier_data", default=None,
              help="permute recipes of two models: also measure the loss barrier (vanilla "
              "against the recipe's alignment) on this evaluation text, and put its table and "
              "plot into the card.")
@click.option("--barrier-lambdas", type=click.IntRange(min=3), default=11, show_default=True)
@click.option("--allow-unsafe-pickle", is_flag=True,
              help=RunSettings.model_fields["allow_unsafe_pickle"].description)
@_friendly
def merge(recipe, out, device, overwrite, barrier_data, barrier_lambdas, allow_unsafe_pickle):
    """Run a MergeKit recipe (any method; `permute` included) with an atomic output."""
    barrier, alignment = recipe_barrier(recipe, out, barrier_data, barrier_lambdas, device,
                                        overwrite, allow_unsafe_pickle) \
        if barrier_data else (None, None)
    run_recipe(recipe, out, device=device, overwrite=overwrite, barrier=barrier,
               allow_unsafe_pickle=allow_unsafe_pickle, alignment=alignment)
    if barrier is not None:
        click.echo(barrier_table(barrier))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--data", "eval_data", required=True,
              help="Evaluation text (.txt/.jsonl/dataset id; .jsonl with text+label for classifiers).")
@click.option("--calibration", default="shakespeare-calib", show_default=True,
              help="Calibration text for the alignment.")
@click.option("--methods", default="vanilla,default", show_default=True,
              help="Comma-separated: vanilla, ffn_only, head_perm, monotonic, ignore_heads, "
              "default, combined with '+', e.g. head_perm+residual=all, default+repair.")
@click.option("--lambdas", type=click.IntRange(min=3), default=21, show_default=True,
              help="Points on the interpolation path (endpoints included; an even count gains "
              "0.5, where the midpoint loss is read).")
@click.option("--eval-samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--eval-max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per evaluation passage  [default: 128, or the model's positions if fewer]")
@click.option("--seed", type=int, default=0, show_default=True, help="Masking seed (MLM).")
@click.option("--out", required=True, type=OUT)
@click.option("--overwrite", is_flag=True)
@common_options
@_friendly
def barrier(models, eval_data, calibration, methods, lambdas, eval_samples,
            eval_max_length, seed, out, overwrite, no_cache, **kw):
    """Measure the loss barrier between MODEL_A and MODEL_B for several alignment methods.

    With three or more MODELS: the loss of the N-model merge (all aligned to the first) for
    each method, against each parent and the vanilla N-average."""
    settings, run = settings_from_cli(kw), settings_from_cli(kw, RunSettings)
    cache = _cache_mode(run, no_cache)
    check_device(run.device)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise UserError("--methods names no method; e.g. --methods vanilla,default")
    if len(models) < 2:
        raise UserError("barrier needs at least two models")
    for name in names:
        settings.with_method(name)   # a misspelt method fails before any work
    out = check_output(out, overwrite, [
        *((f"model {m}", m) for m in models), ("evaluation data", eval_data),
        ("calibration data", calibration),
        ("statistics cache", None if cache == "off" else str(cache_dir()))])
    evaluation = Evaluation(eval_data, eval_samples, eval_max_length, seed, lambdas=lambdas)
    common = dict(calibration=calibration, methods=names, settings=settings,
                  evaluation=evaluation, run=run.model_copy(update={"cache": cache}))
    if len(models) > 2:
        result = run_multi(models, **common)
        with atomic_dir(out, overwrite) as tmp:
            (tmp / "merge.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "merge.md").write_text(multi_table(result) + "\n")
        click.echo(multi_table(result))
        return
    result = run_barrier(*models, **common)
    with atomic_dir(out, overwrite) as tmp:
        write_report(result, tmp)
    click.echo(barrier_table(result))
    learning = ", learning.png" if (out / "learning.png").is_file() else ""
    click.echo(f"wrote {out}/barrier.json, barrier.md, barrier.png{learning}")


@main.command()
@click.option("--out", default="demo-output", show_default=True, type=OUT)
@click.option("--arch", type=click.Choice(["llama", "bert"]), default="llama", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny models (CI-sized), same code path.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Models are trained from seeds SEED and SEED+1.")
@click.option("--overwrite", is_flag=True, help="Replace an existing merged model in --out.")
@_friendly
def demo(out, arch, quick, seed, overwrite):
    """Train two small models from different seeds, measure the barrier, merge. No download."""

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
