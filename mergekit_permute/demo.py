"""The main job on a built-in default: train two small models from different seeds on the
shipped Shakespeare text, measure the loss barrier (vanilla vs. the default alignment), merge
them through MergeKit's `permute` method, and write table, plot and merged model."""

import logging
import time
from pathlib import Path
from typing import Dict

import yaml

from mergekit_permute.barrier import run_barrier, write_report
from mergekit_permute.evaluate import Evaluation
from mergekit_permute.io.outputs import check_output
from mergekit_permute.recipes import run_recipe
from mergekit_permute.settings import AlignSettings
from mergekit_permute.zoo import ZooConfig, train_pair

LOG = logging.getLogger(__name__)

SIZES = {
    # ~3-4 minutes on 2 CPU cores.
    "full": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=1024,
                 seq_len=64, batch=32, steps=400),
    # The same code path, small enough for CI.
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512,
                  seq_len=32, batch=32, steps=120),
}
EVAL = {"full": dict(samples=256, max_length=64, calib=512, lambdas=21),
        "quick": dict(samples=64, max_length=32, calib=160, lambdas=11)}


def run_demo(out: Path, arch: str = "llama", size: str = "full", seeds=(1, 2),
             overwrite: bool = False) -> Dict:
    # A new directory, or an earlier demo's (its models are reused, its reports replaced).
    out = check_output(out / "merged", overwrite).parent if _earlier_demo(Path(out)) else \
        check_output(out, overwrite=False)
    start = time.time()
    zoo = ZooConfig(arch=arch, **SIZES[size])
    ev = EVAL[size]
    model_a, model_b = (str(p) for p in train_pair(zoo, seeds, out / "models"))
    settings = AlignSettings(samples=ev["calib"], max_length=ev["max_length"])

    evaluation = Evaluation("shakespeare-eval", ev["samples"], ev["max_length"],
                            lambdas=ev["lambdas"])
    result = run_barrier(model_a, model_b, methods=["vanilla", "default"], settings=settings,
                         evaluation=evaluation, calibration="shakespeare-calib")
    write_report(result, out)

    recipe = {
        "merge_method": "permute", "base_model": model_a, "dtype": "float32",
        "models": [{"model": model_a}, {"model": model_b}],
        "parameters": {"calibration_data": "shakespeare-calib",
                       "calibration_samples": settings.samples, "max_length": settings.max_length},
    }
    (out / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    # The merged model's card states the measured barrier.
    run_recipe(out / "recipe.yml", out / "merged", overwrite=overwrite, barrier=result)
    result["seconds"] = round(time.time() - start, 1)
    result["seeds"] = list(seeds)
    return result


def _earlier_demo(out: Path) -> bool:
    return (out / "barrier.json").is_file() or any((out / "models").glob("*/zoo.json"))
