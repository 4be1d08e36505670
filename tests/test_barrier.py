import json

import pytest

from mergekit_permute.barrier import run_barrier
from mergekit_permute.evaluate import Evaluation, barrier_values
from mergekit_permute.settings import AlignSettings
from tests.conftest import invoke

def _eval_args(lambdas: int, calibration: str = "shakespeare-calib"):
    return dict(evaluation=Evaluation("shakespeare-eval", 48, 32, lambdas=lambdas),
                calibration=calibration, settings=AlignSettings(samples=120, max_length=32))


def test_barrier_values_match_a_hand_computed_curve():
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [2.0, 3.0, 3.5, 2.5, 1.0]  # B = 2.0 at lambda 0, A = 1.0 at lambda 1
    v = barrier_values(lambdas, losses)
    # linear path: 2.0, 1.75, 1.5, 1.25, 1.0 -> excess 0, 1.25, 2.0, 1.25, 0
    assert v["barrier"] == pytest.approx(2.0) and v["barrier_lambda"] == 0.5
    assert v["barrier_paper"] == pytest.approx(3.5 - 1.5)
    assert (v["loss_a"], v["loss_b"], v["midpoint_loss"]) == (1.0, 2.0, 3.5)


def test_method_names_parse_into_settings():
    base = AlignSettings(samples=7)
    assert base.with_method("vanilla").model_dump(include={"ffn", "attention", "residual"}) == \
        {"ffn": "identity", "attention": "identity", "residual": "identity"}
    s = base.with_method("head_perm+residual=first")
    assert (s.ffn, s.attention, s.residual, s.samples) == ("permute", "head_perm", "first", 7)
    s = base.with_method("default+vo=orthogonal+repair")
    assert (s.ffn, s.attention, s.residual, s.vo, s.repair) == \
        ("permute", "head_perm", "auto", "orthogonal", True)
    with pytest.raises(ValueError, match="unknown method 'headperm'"):
        base.with_method("headperm")
    with pytest.raises(ValueError, match="vo"):
        base.with_method("default+vo=rotate")


def test_a_methods_parts_modify_its_preset_in_any_order():
    base = AlignSettings()
    for first, second in [("repair", "head_perm"), ("residual=all", "head_perm"),
                          ("vo=orthogonal", "default")]:
        assert base.with_method(f"{first}+{second}") == base.with_method(f"{second}+{first}")
    assert base.with_method("repair+head_perm").repair
    assert base.with_method("residual=all+head_perm").residual == "all"
    with pytest.raises(ValueError, match="one preset or 'default' per method"):
        base.with_method("default+vanilla")


@pytest.mark.parametrize("method,message", [
    ("monotonic+qk=joint", "use qk=separate"),
    ("vanilla+qk=separate", "needs attention=head_perm or monotonic"),
    ("ffn_only+qk=joint", "needs attention=head_perm or monotonic"),
])
def test_qk_settings_that_would_do_nothing_are_refused(zoo, method, message):
    from mergekit_permute.io.models import open_pair
    from mergekit_permute.settings import check_settings
    pair = open_pair(*zoo("llama"))
    with pytest.raises(ValueError, match=message):
        check_settings(pair.spec, AlignSettings().with_method(method))
    check_settings(pair.spec, AlignSettings().with_method("monotonic+qk=separate"))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_barrier_of_a_model_with_itself_is_zero(zoo, arch):
    a, _ = zoo(arch)
    r = run_barrier(a, a, methods=["vanilla", "default"], **_eval_args(5))
    for m in r["methods"].values():  # (the orthogonal map of a model to itself is I to ~1e-12)
        assert m["barrier"] == pytest.approx(0.0, abs=1e-5)
        assert max(m["losses"]) - min(m["losses"]) < 1e-5


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_alignment_lowers_the_barrier_and_writes_reports(zoo, tmp_path, arch):
    a, b = zoo(arch)
    out = tmp_path / "barrier"
    # ignore_heads (MHA only) runs on BERT; the GQA Llama refuses it (test below).
    names = ["vanilla", "ffn_only", "head_perm", "monotonic", "default"] + \
        (["ignore_heads"] if arch == "bert" else [])
    r = invoke("mergekit-permute", "barrier", a, b, "--data", "shakespeare-eval",
                "--methods", ",".join(names),
                "--lambdas", "7", "--eval-samples", "48", "--eval-max-length", "32",
                "--samples", "120", "--max-length", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "barrier.json").read_text())
    assert doc["headline"] == "barrier" and len(doc["lambdas"]) == 7
    assert doc["objective"] == ("mlm" if arch == "bert" else "clm")
    methods = doc["methods"]
    assert set(methods) == set(names)
    for m in methods.values():
        assert len(m["losses"]) == 7
        assert m["loss_a"] == m["losses"][-1] and m["loss_b"] == m["losses"][0]
        assert {"barrier", "barrier_paper", "midpoint_loss", "settings"} <= set(m)
    assert methods["default"]["barrier"] <= methods["vanilla"]["barrier"]
    if arch == "bert":
        assert methods["ignore_heads"]["function_preserving"] is False
    # Every function-preserving method keeps both endpoint losses.
    assert methods["head_perm"]["loss_b"] == pytest.approx(methods["vanilla"]["loss_b"], abs=1e-5)
    png = (out / "barrier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| vanilla |" in (out / "barrier.md").read_text()
    assert "| default |" in r.stdout


def test_barrier_refuses_models_without_a_loss(tmp_path):
    from tests.tiny import build
    model = build("BertModel")
    model.save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="no loss to measure"):
        from mergekit_permute.evaluate import objective_for
        objective_for(model)


def test_ignore_heads_is_refused_for_gqa_before_calibration(zoo):
    a, b = zoo("llama")
    with pytest.raises(ValueError, match="grouped-query attention"):
        run_barrier(a, b, methods=["vanilla", "ignore_heads"],
                    **_eval_args(3, calibration="/nonexistent.txt"))


def test_barrier_passes_its_dtype_to_the_calibration(zoo, tmp_path, monkeypatch):
    """`barrier --dtype` sets the calibration forwards' dtype on a GPU, as in `align` (on the
    CPU they run in float32 whatever it says): the option reaches the workload."""
    import mergekit_permute.barrier as barrier
    seen = []
    real = barrier.Workload

    def record(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)
    monkeypatch.setattr(barrier, "Workload", record)
    a, b = zoo("llama")
    r = invoke("mergekit-permute", "barrier", a, b, "--data", "shakespeare-eval", "--methods",
               "default", "--samples", "64", "--max-length", "32", "--eval-samples", "8",
               "--lambdas", "3", "--dtype", "bfloat16", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert seen == ["bfloat16"]
