"""N >= 3 models aligned to the running average (reference=average), with and without REPAIR,
in memory, through a MergeKit recipe and through `barrier`."""

import json

import pytest
import torch
import transformers as T
from click.testing import CliRunner

from mergekit_permute.cli import main
from mergekit_permute.io.models import load_model
from mergekit_permute.align.multi import align_all
from mergekit_permute.align.pipeline import align
from mergekit_permute.settings import AlignSettings
from tests.conftest import third_model
from tests.test_merge import PARAMS, recipe
from tests.tiny import inputs

SETTINGS = AlignSettings(samples=120, max_length=32, reference="average")


@pytest.fixture(scope="module")
def trio(zoo, tmp_path_factory):
    """A, B and a third model: A randomly permuted (function kept), then nudged."""
    a, b = zoo("llama")
    return a, b, third_model(a, tmp_path_factory.mktemp("third") / "c", 0.01, permute_seed=5)


def test_running_average_of_two_is_alignment_to_the_base_and_keeps_functions(trio):
    a, b, c = trio
    alignments = align_all([a, b, c], [1.0, 1.0, 1.0], "shakespeare-calib", SETTINGS)
    # The first model's running average is the base itself.
    to_base = align(a, b, "shakespeare-calib", SETTINGS.model_copy(update={"reference": "base"}))
    for space, views in to_base.transforms.items():
        for view, t in views.items():
            torch.testing.assert_close(alignments[0].transforms[space][view], t, rtol=0, atol=0)
    # The third model is matched against a blend, and C is (almost) a permuted A: aligning it
    # must undo most of that permutation, and it computes its own function (fp32, tight).
    assert alignments[1].info["reference"] == "average"
    for path, alignment in ((b, alignments[0]), (c, alignments[1])):
        model = load_model(path)
        kw = inputs(model)
        before = model(**kw).logits.detach()
        alignment.apply_to_model(model)
        torch.testing.assert_close(model(**kw).logits.detach(), before, rtol=1e-4, atol=1e-5)
    ffn = alignments[1].report["ffn.0"]
    assert ffn["mean_corr_after"] > ffn["mean_corr_before"] + 0.3


def test_recipe_and_barrier_with_running_average_and_repair(trio, tmp_path):
    a, b, c = trio
    models = [{"model": a}, {"model": b}, {"model": c}]
    path = recipe(tmp_path, a, b, params={**PARAMS, "reference": "average", "repair": True},
                  models=models)
    r = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "running average" in (tmp_path / "m" / "README.md").read_text()
    doc = json.loads((tmp_path / "m" / "alignment-2.json").read_text())
    assert doc["settings"]["reference"] == "average" and doc["reference"] == "average"
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.isfinite(merged(**inputs(merged)).logits).all()
    r = CliRunner().invoke(main, ["barrier", a, b, c, "--data", "shakespeare-eval",
                                  "--eval-samples", "32", "--eval-max-length", "32",
                                  "--samples", "120", "--max-length", "32", "--methods",
                                  "vanilla,default,default+reference=average,"
                                  "default+reference=average+repair",
                                  "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "ev" / "merge.json").read_text())
    losses = {m: v["merge_loss"] for m, v in doc["methods"].items()}
    assert losses["default+reference=average"] < losses["vanilla"]
    assert losses["default+reference=average+repair"] != losses["default+reference=average"]


def test_a_recipe_aligns_its_models_in_the_order_it_lists_them(trio, tmp_path):
    """With reference=average each model joins the average of those listed before it: the
    recipe's order, not the paths' alphabetical one."""
    from mergekit.config import MergeConfiguration
    from mergekit_permute.mergekit.run import validate_recipe
    a, b, c = trio
    for order in ([a, c, b], [a, b, c]):
        config = MergeConfiguration.model_validate({
            "merge_method": "permute", "base_model": a, "dtype": "float32",
            "models": [{"model": m} for m in order], "parameters": {"reference": "average"}})
        assert validate_recipe(config)[3] == order[1:]


def test_running_average_with_a_zero_weight_base(trio):
    """Base weight 0 (the merge of the others, in the base's basis): the first model is
    aligned to the base itself (the maps of reference=base), the second to the first, aligned."""
    a, b, c = trio
    zero = align_all([a, b, c], [0.0, 1.0, 1.0], "shakespeare-calib", SETTINGS, workers=1)
    to_base = align(a, b, "shakespeare-calib", SETTINGS.model_copy(update={"reference": "base"}),
                    workers=1)
    state = T.AutoModelForCausalLM.from_pretrained(b).state_dict()
    got, want = zero[0].state_dict(state), to_base.state_dict(state)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(zero) == 2 and zero[1].info["aligned_to"] == "running average of 2 model(s)"
