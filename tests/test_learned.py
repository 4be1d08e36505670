"""Learned alignment: every learned symmetry is exact (random maps keep B's function; a
near-miss of each breaks it), and `matching: learned` end to end."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_permute.cli import main
from mergekit_permute.align.maps import Maps
from mergekit_permute.core.permute import (
    Scaled, apply_to_model, as_matrix, compose, fold_scales,
)
from mergekit_permute.spec import spec_for_config
from tests.conftest import invoke
from tests.test_merge import PARAMS, recipe
from tests.tiny import build, inputs, outputs

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPTNeoXForCausalLM",
         "BertForMaskedLM", "GPT2LMHeadModel-untied", "Phi3ForCausalLM", "GemmaForCausalLM-untied",
         "Gemma2ForCausalLM", "LlamaForCausalLM-biases", "Qwen3ForCausalLM-bias",
         "GemmaForCausalLM-bias", "Phi3ForCausalLM-odd-rotary", "GPT2LMHeadModel-scaled"]


def _random_maps(spec, folded: bool, seed: int = 0, scale: float = 0.3) -> Maps:
    maps = Maps(spec, rotate_residual=folded)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in maps.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return maps


def _apply(model, spec, transforms, folded):
    out = copy.deepcopy(model)
    fold = fold_scales(spec, model.state_dict()) if folded else None
    apply_to_model(spec, out, transforms, fold)
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_random_learned_maps_keep_the_function(name):
    model = build(name)
    spec = spec_for_config(model.config)
    folded = spec.orthogonal_residual_error() is None
    maps = _random_maps(spec, folded)
    with torch.no_grad():
        transforms = {s: {v: (t if not isinstance(t, torch.Tensor) or not t.is_floating_point()
                              else t.double()) for v, t in views.items()}
                      for s, views in maps.transforms().items()}
    kw = inputs(model)
    for x, y in zip(outputs(_apply(model, spec, transforms, folded), kw), outputs(model, kw)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    learned = {n.split(".")[0] for n, _ in maps.named_parameters()}
    assert "vo" in learned and ("residual" in learned) == folded
    assert ("qk_angle" in learned) == (spec.space("attn.0").heads.qk_frozen_dims > 0
                                       and not spec.qk_normed)
    assert ("ffn" in learned) == spec.space("ffn.0").gated


def test_maps_inside_a_qk_normed_head_are_refused(monkeypatch):
    """Qwen3's q_norm/k_norm have per-dim gains: a RoPE-commuting Q/K map (exact for Llama)
    changes its function, and the symmetry check says so (learning never makes one)."""
    from mergekit_permute.core.symmetry import NotASymmetry, check_symmetry
    from mergekit_permute.spec.base import PermutationSpec
    for name in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        model = build(name)
        spec = spec_for_config(model.config)
        with monkeypatch.context() as m:   # maps as if Q/K could move inside a head
            m.setattr(PermutationSpec, "qk_normed", property(lambda self: False))
            with torch.no_grad():
                transforms = _random_maps(spec, folded=False, scale=1.0).final()
        transforms = {s: {v: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                              else x) for v, x in views.items()} for s, views in transforms.items()}
        kw = inputs(model)
        same = all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in
                   zip(outputs(_apply(model, spec, transforms, False), kw), outputs(model, kw)))
        if name == "LlamaForCausalLM":
            assert same
            check_symmetry(spec, transforms)
        else:
            assert not same
            with pytest.raises(NotASymmetry, match="q_norm/k_norm gains are per dim"):
                check_symmetry(spec, transforms)


def _broken(name, what):
    model = build(name)
    with torch.no_grad():  # sharpen attention, so scores matter
        for pname, p in model.named_parameters():
            if pname.endswith(("q_proj.weight", "query.weight")):
                p.mul_(20)
    spec = spec_for_config(model.config)
    folded = spec.orthogonal_residual_error() is None
    with torch.no_grad():
        t = _random_maps(spec, folded, scale=1.0).transforms()
    t = {s: {v: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
             for v, x in views.items()} for s, views in t.items()}
    attn, ffn = t["attn.0"], t["ffn.0"]
    if what == "gate_scaled":        # SwiGLU: the gate does not commute with a scale
        ffn["gate"] = Scaled(ffn[""].index, ffn[""].scale)
    elif what == "qk_not_inverse":   # keys must take M^-T, not M
        attn["k"] = torch.linalg.inv(attn["k"]).T
    elif what == "qk_adjacent_pairs":  # RoPE pairs dim i with i + d/2, not with i + 1
        d = spec.space("attn.0").heads.head_dim
        p = torch.arange(attn["q"].shape[0]).reshape(-1, d)
        swap = torch.cat([p[:, 0::2], p[:, 1::2]], 1).reshape(-1)   # interleave -> halves
        attn["q"] = attn["q"][swap][:, swap]
        attn["k"] = attn["k"][swap[:attn["k"].shape[0]]][:, swap[:attn["k"].shape[0]]]
    elif what == "residual_unfolded":  # a rotation needs the norm gains folded first
        folded = False
        t = {s: {v: x for v, x in views.items()} for s, views in t.items()}
    model_t = copy.deepcopy(model)
    fold = fold_scales(spec, model.state_dict()) if folded else None
    try:
        apply_to_model(spec, model_t, t, fold)
    except ValueError:
        return float("inf")   # refused: as good as broken
    kw = inputs(model)
    return float((outputs(model_t, kw)[0] - outputs(model, kw)[0]).abs().max())


@pytest.mark.parametrize("name,what", [
    ("LlamaForCausalLM", "gate_scaled"),
    ("LlamaForCausalLM", "qk_not_inverse"),
    ("LlamaForCausalLM", "qk_adjacent_pairs"),
    ("LlamaForCausalLM", "residual_unfolded"),
    ("BertForMaskedLM", "qk_not_inverse"),
])
def test_near_misses_of_each_symmetry_break_the_function(name, what):
    """Negative controls: the rules above are what makes the maps exact."""
    assert _broken(name, what) > 1e-3


def test_compose_and_invert_scaled_permutations():
    gen = torch.Generator().manual_seed(0)
    p0, p1 = torch.randperm(6, generator=gen), torch.randperm(6, generator=gen)
    s0, s1 = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5, \
        torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    both = compose(Scaled(p0, s0), Scaled(p1, s1))
    torch.testing.assert_close(as_matrix(both), as_matrix(Scaled(p0, s0)) @ as_matrix(Scaled(p1, s1)))
    dense = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(compose(p0, dense), as_matrix(p0) @ dense)


def _align_learned(a, b, out, samples: int, steps: int, *extra: str) -> dict:
    """`align --matching learned` run in-process; its alignment.json."""
    r = CliRunner().invoke(main, ["align", a, b, "--data", "shakespeare-calib", "--samples",
                                  str(samples), "--max-length", "32", "--matching", "learned",
                                  "--learn-steps", str(steps), "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / "alignment.json").read_text())


def test_learned_alignment_end_to_end(zoo, tmp_path):
    a, b = zoo("llama")
    out = tmp_path / "aligned"
    doc = _align_learned(a, b, out, samples=120, steps=40)
    learned = doc["learned"]
    assert learned["held_out_loss_best"] <= learned["held_out_loss_start"]
    # every held-out check recorded: the start at step 0, the best among them
    steps, losses = zip(*learned["held_out_checks"])
    assert steps[0] == 0 and list(steps) == sorted(steps) and steps[-1] == learned["steps_run"]
    assert losses[0] == learned["held_out_loss_start"]
    assert min(losses) == pytest.approx(learned["held_out_loss_best"], abs=2e-6)
    assert {"residual", "vo", "ffn", "qk_angle"} <= set(learned["maps"])
    assert "matching=learned" in doc["label"] and "learn_steps=40" in doc["label"]
    assert doc["timings"]["learn_seconds"] > 0
    # B's function, exactly (fp32), from the written checkpoint.
    import transformers as T
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        x = T.AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        y = T.AutoModelForCausalLM.from_pretrained(b)(input_ids=ids).logits
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    # The saved transforms replay exactly (apply), and carry the SwiGLU scales.
    perms = load_file(out / "permutations.safetensors")
    assert "ffn.0#scale" in perms and not torch.all(perms["ffn.0#scale"] == 1)
    r = CliRunner().invoke(main, ["apply", str(out), b, "--out", str(tmp_path / "applied")])
    assert r.exit_code == 0, r.output
    for k, v in load_file(tmp_path / "applied" / "model.safetensors").items():
        torch.testing.assert_close(v, load_file(out / "model.safetensors")[k], rtol=0, atol=0)


def test_a_stalled_run_backs_off_to_its_best_maps_at_half_the_rate(zoo, tmp_path):
    """A rate too high for the models: the held-out loss rises from the start. With the default
    `learn_plateau: backoff` the run goes back to its best maps at half the rate after a third
    of its steps and goes on; with `stop` it ends there."""
    a, b = zoo("llama")
    runs = {plateau: _align_learned(a, b, tmp_path / plateau, 120, 40, "--learn-lr", "0.3",
                                    "--learn-plateau", plateau, "--permutations-only")["learned"]
            for plateau in ("backoff", "stop")}
    backoff, stop = runs["backoff"], runs["stop"]
    # identical up to the plateau (same seed, same steps)
    assert backoff["held_out_checks"][:5] == stop["held_out_checks"]
    assert stop["steps_run"] == 20 and stop["backoffs"] == [] and stop["on_plateau"] == "stop"
    # patience: a third of 40 steps, at least 4 checks of 5 steps
    assert backoff["backoffs"] == [[20, 0.15]] and backoff["steps_run"] == 40
    after = [loss for step, loss in backoff["held_out_checks"] if step > 20]
    # it goes on from the best maps at the lower rate, and ends below where the path had gone
    assert len(after) == 4 and after[-1] < backoff["held_out_checks"][4][1]
    assert backoff["held_out_loss_best"] <= stop["held_out_loss_best"]
    # the merge card says it
    from mergekit_permute.card import learned_line
    assert learned_line(backoff).endswith("halved (back to the best maps) at step 20")
    assert "halved" not in learned_line(stop)


def test_learned_loss_reads_learn_samples_passages_and_holds_out_a_tenth_of_calibration(
        zoo, tmp_path):
    """The learned loss trains on `learn_samples` passages of the calibration data (more text
    than the statistics need), holding out a tenth of the calibration passages' batches; with
    learn_samples at most the calibration passages it is the calibration text itself."""
    a, b = zoo("llama")
    more = _align_learned(a, b, tmp_path / "more", 80, 3, "--learn-samples", "400",
                          "--batch-size", "8")["learned"]
    assert (more["passages"], more["held_out_passages"]) == (392, 8)   # 400 read, 10 batches: 1
    same = _align_learned(a, b, tmp_path / "same", 80, 3, "--learn-samples", "2",
                          "--batch-size", "8")["learned"]
    assert (same["passages"], same["held_out_passages"]) == (72, 8)
    # the built-in calibration file holds 693 passages: what is there is used
    all_ = _align_learned(a, b, tmp_path / "all", 80, 3, "--learn-samples", "100000",
                          "--batch-size", "8")["learned"]
    assert all_["passages"] + all_["held_out_passages"] == 693


def test_learned_loss_batches_sample_the_whole_text(zoo, tmp_path, monkeypatch):
    """Files are often ordered (by date, by play): the learned loss's passages are shuffled with
    a fixed seed, so the held-out slice is not the file's last stretch, and reruns agree."""
    import mergekit_permute.align.learn as learn
    a, b = zoo("llama")
    data = tmp_path / "ordered.txt"
    data.write_text("".join(f"passage {i} " + "word " * 8 + "\n" for i in range(200)))
    seen = []
    monkeypatch.setattr(learn, "learn", lambda *args, **kw: seen.append(args[4]) or args[3][0])
    for run in ("one", "two"):
        r = CliRunner().invoke(main, ["align", a, b, "--data", str(data), "--samples", "100",
                                      "--max-length", "32", "--batch-size", "10", "--matching",
                                      "learned", "--learn-samples", "200", "--out",
                                      str(tmp_path / run)])
        assert r.exit_code == 0, r.output
    (train, held), (train2, held2) = seen
    assert len(held) == 1 and len(train) == 19
    for x, y in zip(train + held, train2 + held2):
        assert torch.equal(x["input_ids"], y["input_ids"])
    from transformers import AutoTokenizer
    from mergekit_permute.io.batches import tokenize
    lines = data.read_text().splitlines()
    in_order = tokenize(AutoTokenizer.from_pretrained(a), [t.strip() for t in lines], 32, 10,
                        "LlamaForCausalLM", "clm")
    rows = lambda bs: sorted(tuple(r[m.bool()].tolist()) for b in bs  # noqa: E731
                             for r, m in zip(b["input_ids"], b["attention_mask"]))
    assert rows(train + held) == rows(in_order)            # the same passages, all of them
    assert rows(held) != rows(in_order[-1:])               # not the file's last ten
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(train, in_order))


def test_learned_alignment_of_a_tied_mlm(zoo, tmp_path):
    """BERT's decoder is tied to its embeddings: the learned loss sees one tensor for both.
    With the head permutations learned too (Sinkhorn), projected to permutations at the end."""
    a, b = zoo("bert")
    out = tmp_path / "aligned"
    learned = _align_learned(a, b, out, 64, 10, "--learn-heads", "--learn-estimator",
                             "sinkhorn")["learned"]
    assert learned["held_out_loss_best"] <= learned["held_out_loss_start"]
    assert "head_scores" in learned["maps"] and learned["permutation_estimator"] == "sinkhorn"
    import transformers as T
    ids = torch.tensor([[2, 40, 41, 4, 43, 44, 3]])
    with torch.no_grad():
        x = T.AutoModelForMaskedLM.from_pretrained(out)(input_ids=ids).logits
        y = T.AutoModelForMaskedLM.from_pretrained(b)(input_ids=ids).logits
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_learned_in_a_recipe_and_as_a_barrier_method(zoo, tmp_path):
    a, b = zoo("llama")
    r = invoke("mergekit-permute", "barrier", a, b, "--data", "shakespeare-eval",
               "--samples", "120", "--max-length", "32", "--eval-samples", "32",
               "--eval-max-length", "32", "--lambdas", "3", "--learn-steps", "30",
               "--methods", "default,default+matching=learned", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "b" / "barrier.json").read_text())
    plain, learned = doc["methods"]["default"], doc["methods"]["default+matching=learned"]
    assert learned["loss_b"] == pytest.approx(plain["loss_b"], abs=1e-4)   # B unchanged
    assert learned["settings"]["matching"] == "learned"
    # its held-out checks drawn beside the barrier plot
    assert (tmp_path / "b" / "learning.png").stat().st_size > 0
    # a MergeKit recipe, its lambda a YAML number
    params = {**PARAMS, "residual": "auto", "matching": "learned", "learn_steps": 10,
              "learn_lambdas": 0.5}
    r = invoke("mergekit-yaml", recipe(tmp_path, a, b, params), tmp_path / "merged")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "merged" / "alignment.json").read_text())
    assert info["settings"]["matching"] == "learned"
    assert info["learned"]["steps_run"] == 10 and info["learned"]["lambdas"] == [0.5]


@pytest.mark.parametrize("name, estimator", [("LlamaForCausalLM", "ste"),
                                             ("BertForMaskedLM", "ste"),
                                             ("LlamaForCausalLM", "sinkhorn")])
def test_learned_ffn_permutations_end_as_hard_permutations(name, estimator):
    """Straight-through or Sinkhorn scores: whatever they hold, the final maps are permutations
    (scaled for SwiGLU) that keep B's function."""
    model = build(name)
    spec = spec_for_config(model.config)
    folded = spec.orthogonal_residual_error() is None
    maps = Maps(spec, rotate_residual=folded, permute_ffn=True, estimator=estimator)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in maps.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    with torch.no_grad():
        final = maps.final()
    ffn = final["ffn.0"][""]
    index = ffn.index if isinstance(ffn, Scaled) else ffn
    assert sorted(index.tolist()) == list(range(len(index)))
    assert not torch.equal(index, torch.arange(len(index)))      # the scores moved neurons
    final = {s: {v: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                 for v, t in views.items()} for s, views in final.items()}
    kw = inputs(model)
    for x, y in zip(outputs(_apply(model, spec, final, folded), kw), outputs(model, kw)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, estimator", [("LlamaForCausalLM", "ste"),
                                             ("BertForMaskedLM", "sinkhorn"),
                                             ("Qwen3ForCausalLM", "ste"),
                                             ("GPT2LMHeadModel-untied", "sinkhorn")])
def test_learned_head_permutations_move_whole_kv_groups_and_keep_the_function(name, estimator):
    """learn_heads: whatever the scores hold, the final maps move whole KV groups (their query
    heads with them) and keep B's function; GQA's query heads stay in their group's order."""
    model = build(name)
    spec = spec_for_config(model.config)
    folded = spec.orthogonal_residual_error() is None
    maps = Maps(spec, rotate_residual=folded, estimator=estimator, permute_heads=True)
    heads = spec.space("attn.0").heads
    assert set(maps.head_scores) == {s.name.replace(".", "_") for s in spec.spaces
                                     if s.kind == "attention"}
    with torch.no_grad():
        for key, scores in maps.head_scores.items():   # a clear winner: groups reversed
            scores.copy_(torch.eye(heads.num_kv_heads).flip(1) + 0.1 * torch.randn(scores.shape))
        final = maps.final()
    d = heads.head_dim
    for view, per_group in (("k", d), ("q", heads.group_size * d)):
        m = as_matrix(final["attn.0"][view], heads.num_kv_heads * per_group
                      if view == "k" else heads.num_heads * d).abs() > 1e-9     # [n, n] support
        blocks = m.reshape(heads.num_kv_heads, per_group, heads.num_kv_heads, per_group).any(3).any(1)
        assert torch.equal(blocks, torch.eye(heads.num_kv_heads, dtype=torch.bool).flip(1))
    final = {s: {v: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                 for v, t in views.items()} for s, views in final.items()}
    kw = inputs(model)
    for x, y in zip(outputs(_apply(model, spec, final, folded), kw), outputs(model, kw)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    if estimator == "sinkhorn":   # soft while learning: gradient reaches every score
        maps.zero_grad()
        v = maps.transforms()["attn.0"]["v"]
        (v * torch.randn(v.shape)).sum().backward()
        assert bool((maps.head_scores["attn_0"].grad != 0).all())


def test_sinkhorn_is_soft_while_learning_and_doubly_stochastic():
    """The Sinkhorn estimator's matrix: rows and columns sum to one, starts near (not at) the
    identity, and carries gradient to every score; projected, it is a permutation."""
    spec = spec_for_config(build("LlamaForCausalLM").config)
    maps = Maps(spec, rotate_residual=False, permute_ffn=True, estimator="sinkhorn")
    m = maps.transforms()["ffn.0"]["gate"]
    torch.testing.assert_close(m.sum(0), torch.ones(m.shape[0]))
    torch.testing.assert_close(m.sum(1), torch.ones(m.shape[0]))
    diag = m.detach().diagonal()
    assert 0.9 < float(diag.min()) and float(diag.max()) < 0.99        # near I, soft
    with torch.no_grad():
        maps.ffn_scores["ffn_0"].add_(torch.randn(m.shape, generator=torch.Generator().manual_seed(0)))
    m = maps.transforms()["ffn.0"]["gate"]
    assert float(m.detach().max(1).values.min()) < 0.99       # soft: not a permutation
    torch.testing.assert_close(m.sum(0), torch.ones(m.shape[0]))
    (m * torch.randn(m.shape)).sum().backward()
    assert int((maps.ffn_scores["ffn_0"].grad != 0).sum()) > m.shape[0]   # beyond one per row
    hard = maps.transforms(hard=True)["ffn.0"]["gate"].detach()
    assert torch.equal(hard.sum(0), torch.ones(m.shape[0])) and set(hard.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "GPTNeoXForCausalLM", "BertForMaskedLM",
                                  "GPT2LMHeadModel-untied"])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(name):
    """Blocks recomputed in the backward pass, their merged weights built inside (learned
    alignment at real size): the loss and every map's gradient as the whole-model path's."""
    from accelerate import init_empty_weights
    from mergekit_permute.align.learn import _Problem
    from mergekit_permute.core.alignment import Alignment
    from mergekit_permute.settings import AlignSettings
    a, b = build(name, seed=0), build(name, seed=1)
    spec = spec_for_config(a.config)
    with init_empty_weights(include_buffers=False):
        container = type(a)(a.config).eval()
    container.tie_weights()
    names = [n for n, _ in container.named_parameters()]
    states = [{n: m.get_parameter(n).detach() for n in names} for m in (a, b)]
    start = Alignment.identity(spec, AlignSettings())
    kw = inputs(a)
    batches = [{**kw, "labels": kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)}]
    maps = _random_maps(spec, folded=False)
    results = []
    for checkpoint in (False, True):
        problem = _Problem(spec, container, *states, start, "cpu", torch.float32, checkpoint)
        maps.zero_grad()
        loss = problem.loss(maps, batches, (0.3, 0.5))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in maps.named_parameters()
                                        if p.grad is not None}))
    half = _Problem(spec, container, *states, start, "cpu", torch.bfloat16, True)
    half_loss = half.loss(maps, batches, (0.3, 0.5)).detach()   # A and B held in bf16
    (plain, grads), (ckpt, grads_ckpt) = results
    torch.testing.assert_close(half_loss, plain, rtol=2e-2, atol=0)
    assert all(v.dtype == torch.bfloat16 for v in half.b.values() if v.is_floating_point())
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-6)
    assert grads and grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-5, atol=1e-6)
    assert not any("forward" in vars(m) for m in container.modules())   # blocks restored


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "GPTNeoXForCausalLM",
                                  "GPT2LMHeadModel-untied", "Phi3ForCausalLM"])
def test_reader_matrices_are_inverted_once_per_loss(name, monkeypatch):
    """A learned matrix's M^-T is computed once per loss (`with_readers`), not once per weight
    that reads through it (the residual has a reader per block input and the head): the same
    loss and gradients as inverting at every reader, whole-model and checkpointed."""
    from accelerate import init_empty_weights
    import mergekit_permute.align.learn as learn
    from mergekit_permute.core.alignment import Alignment
    from mergekit_permute.core.permute import identity_transforms, norm_gains
    from mergekit_permute.settings import AlignSettings
    a, b = build(name, seed=0), build(name, seed=1)
    spec = spec_for_config(a.config)
    assert ("residual", "") in spec.reader_views()
    with init_empty_weights(include_buffers=False):
        container = type(a)(a.config).eval()
    container.tie_weights()
    names = [n for n, _ in container.named_parameters()]
    states = [{n: m.get_parameter(n).detach() for n in names} for m in (a, b)]
    kw = inputs(a)
    batches = [{**kw, "labels": kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)}]
    start = Alignment(spec=spec, transforms=identity_transforms(spec), settings=AlignSettings(),
                      gains_a=norm_gains(spec, states[0]), gains_b=norm_gains(spec, states[1]))
    maps = _random_maps(spec, folded=True)
    inverted = []
    own_inv = torch.linalg.inv
    monkeypatch.setattr(torch.linalg, "inv",   # (2-D: a reader's; the K maps' are batched)
                        lambda m: (m.ndim == 2 and inverted.append(m.shape)) or own_inv(m))
    results = {}
    for once in (True, False):
        with monkeypatch.context() as m:
            if not once:
                m.setattr(learn, "with_readers", lambda t, views: t)
            for checkpoint in (False, True):
                problem = learn._Problem(spec, container, *states, start, "cpu",
                                         torch.float32, checkpoint)
                maps.zero_grad()
                inverted.clear()
                loss = problem.loss(maps, batches, (0.5,))
                loss.backward()
                results[once, checkpoint] = (loss.detach(), len(inverted), {
                    n: p.grad.clone() for n, p in maps.named_parameters() if p.grad is not None})
    matrices = sum(1 for space, view in spec.reader_views()
                   if isinstance(maps.transforms()[space][view], torch.Tensor)
                   and maps.transforms()[space][view].is_floating_point())
    for checkpoint in (False, True):
        (loss, count, grads), (loss0, count0, grads0) = (results[True, checkpoint],
                                                         results[False, checkpoint])
        assert count == matrices < count0
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
        assert grads.keys() == grads0.keys() and "residual" in grads
        for n in grads:
            torch.testing.assert_close(grads[n], grads0[n], rtol=1e-4, atol=1e-6)


def test_checkpointed_learning_matches_whole_model_learning(zoo, tmp_path, monkeypatch):
    """`matching: learned` with every block recomputed (as at real size) learns what the
    whole-model path learns."""
    import mergekit_permute.align.learn as learn
    a, b = zoo("llama")
    plain = _align_learned(a, b, tmp_path / "plain", samples=120, steps=20)["learned"]
    monkeypatch.setattr(learn, "CHECKPOINT_FROM", 0)
    ckpt = _align_learned(a, b, tmp_path / "ckpt", samples=120, steps=20)["learned"]
    assert ckpt["best_step"] == plain["best_step"] and ckpt["steps_run"] == plain["steps_run"]
    assert ckpt["held_out_loss_best"] == pytest.approx(plain["held_out_loss_best"], abs=1e-5)


@pytest.mark.parametrize("order", ["better_first", "better_last"])
def test_best_start_keeps_the_better_start_and_one_problem_at_a_time(order, monkeypatch):
    """learn_init=best: the start with the lower held-out merged loss is kept (its loss as a
    fresh problem's), whichever comes first; no two copies of A and B are alive together."""
    import gc
    import weakref
    import mergekit_permute.align.learn as learn
    from mergekit_permute.align.learn import Schedule, _Problem, _best_start
    from mergekit_permute.align.weight_match import weight_match_alignment
    from mergekit_permute.core.alignment import Alignment
    from mergekit_permute.settings import AlignSettings
    a, b = build("LlamaForCausalLM", seed=0), build("LlamaForCausalLM", seed=1)
    spec = spec_for_config(a.config)
    model = type(a)(a.config).eval()
    states = [{n: t.detach() for n, t in m.state_dict().items()} for m in (a, b)]
    kw = inputs(a)
    held = [{**kw, "labels": kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)}]
    schedule = Schedule(steps=1, lr=1e-2)
    identity = Alignment.identity(spec, AlignSettings(residual="all"))
    matched = weight_match_alignment(spec, *states, AlignSettings(matching="weights",
                                                                  residual="all"))
    loss = {}
    for name, start in (("identity", identity), ("weights", matched)):
        with torch.no_grad():
            problem = _Problem(spec, model, *states, start, "cpu")
            loss[name] = float(problem.loss(Maps(spec, start.folded), held, (0.5,)))
    del problem
    better = min(loss, key=loss.get)
    starts = {"identity": identity, "weights": matched}
    names = [better, *(n for n in starts if n != better)]
    if order == "better_last":
        names.reverse()
    alive, most = [], [0]
    real_init = _Problem.__init__

    def counting_init(self, *args, **kwargs):
        alive[:] = [r for r in alive if r() is not None]
        real_init(self, *args, **kwargs)
        alive.append(weakref.ref(self))
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))
    monkeypatch.setattr(learn._Problem, "__init__", counting_init)
    problem, _, got = _best_start(spec, model, states, [starts[n] for n in names], held,
                                  schedule, "cpu", torch.float32, False)
    assert problem.start is starts[better]
    assert got == pytest.approx(loss[better], rel=1e-6)
    assert most[0] == 1
