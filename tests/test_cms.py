"""Continuum memory system: CMS blocks (models.cms) and the period schedule (methods.cms).

- a level's parameters change exactly at the steps t with (t + 1) % C == 0 and nowhere else;
- the applied gradient is the mean of the chunk's gradients (hand numbers, then a tiny Llama with SGD);
- add_cms keeps the shipped base's outputs; CMS models survive save/load and the base config;
- a tiny `forgetless run` (domain + facts) with method cms, interrupted and resumed to the same R.
"""

import copy

import pytest
import torch
from helpers import tiny_llama
from torch import nn

import forgetless.experiments.runner as run_mod
from forgetless.config import from_dict
from forgetless.errors import ConfigError
from forgetless.experiments.runner import load_run_config, run
from forgetless.methods import make_method
from forgetless.methods.base import MethodContext, lm_loss_masked
from forgetless.models.base import MemorySection, ModelConfig, build_base
from forgetless.models.checkpoint import load_model, save_model
from forgetless.models.cms import (
    CMS_CONFIG_KEY,
    CMSConfig,
    ContinuumMLP,
    LevelSchedule,
    add_cms,
    cms_levels,
)
from forgetless.models.memory import MemoryConfig, add_memory_layers
from forgetless.training import Experience, fit_experience


def tiny(layers=3, seed=0):
    return tiny_llama(layers=layers, seed=seed)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (2, 8), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(method, model, steps, on_step=None):
    """``steps`` steps on ``batch(0..steps-1)`` through the one lifecycle; ``on_step(step)`` after each."""
    if on_step:
        after = method.after_step
        method.after_step = lambda m, s: (after(m, s), on_step(s))
    return fit_experience(method, model, MethodContext(), Experience("e", batch, steps), progress=False).model


# --------------------------------------------------------------------------- the rule on hand-made numbers
def test_schedule_steps_with_the_mean_of_the_chunk_on_hand_numbers():
    w = nn.Parameter(torch.zeros(()))
    v = nn.Parameter(torch.zeros(()))
    sched = LevelSchedule([(2, [("w", w)]), (1, [("v", v)])])
    opt = torch.optim.SGD([w, v], lr=1.0)
    seen_w = []
    for c in [1.0, 3.0, 5.0, 7.0, 9.0]:
        (c * w + c * v).backward()  # dL/dw = dL/dv = c
        sched.after_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen_w.append(float(w.detach()))
    # w steps after t=1 with (1+3)/2 = 2 and after t=3 with (5+7)/2 = 6; 9 is pending
    assert seen_w == [0.0, -2.0, -2.0, -8.0, -8.0]
    assert float(v.detach()) == -(1 + 3 + 5 + 7 + 9)  # period 1: its own gradient every step
    state = sched.state_tensors()
    assert int(state["step"][0]) == 5 and torch.equal(state["buf.w"], torch.tensor(9.0))
    again = LevelSchedule()
    again.load_state_tensors(state)
    again.set_levels([(2, [("w", w)])])
    (11.0 * w).backward()
    again.after_backward()
    assert float(w.grad) == 10.0  # (9 + 11) / 2 after the resume
    stale = LevelSchedule()
    stale.load_state_tensors(state)
    with pytest.raises(ConfigError, match="pending gradients"):
        stale.set_levels([(2, [("other", v)])])  # a resume whose levels lack the pending "w"


# --------------------------------------------------------------------------- periods on a tiny Llama
def test_levels_change_only_at_multiples_of_their_period():
    model = add_cms(tiny(), layers=[1], periods=[1, 2, 3], hidden=8)
    method = make_method("cms", lr=1e-2, periods=[4, None, 1])
    levels = method.levels(model)
    periods = [c for c, _ in levels]
    assert periods == [4, 1, 1, 2, 3]  # layer 0 MLP, layer 2 MLP, then the CMS block's levels 1..3
    groups = [(c, [n for n, _ in named]) for c, named in levels]
    level_names = {n for _, names in groups for n in names}
    others = [n for n, _ in model.named_parameters() if n not in level_names]
    assert any("self_attn" in n for n in others) and all(".mlp." not in n for n in others)
    steps = 12
    snaps = [snapshot(model)]
    train(method, model, steps, on_step=lambda s: snaps.append(snapshot(model)))
    for c, names in groups:
        changed = [t for t in range(steps) if any(not torch.equal(snaps[t + 1][n], snaps[t][n]) for n in names)]
        assert changed == [t for t in range(steps) if (t + 1) % c == 0], (c, names[0], changed)
    # others train every step; the new levels started at zero output and have moved
    assert all(not torch.equal(snaps[t + 1][others[0]], snaps[t][others[0]]) for t in range(steps))
    block = model.model.layers[1].mlp
    assert block.levels[1].down_proj.weight.abs().sum() > 0 and block.levels[2].down_proj.weight.abs().sum() > 0


def test_mapping_periods_frozen_levels_and_frozen_others():
    model = tiny()
    method = make_method("cms", lr=1e-2, periods={3: [2], 0: [0]}, others="freeze")
    groups = [(c, [n for n, _ in named]) for c, named in method.levels(model)]
    assert [c for c, _ in groups] == [0, 1, 3]
    snaps = [snapshot(model)]
    train(method, model, 6, on_step=lambda s: snaps.append(snapshot(model)))
    level_names = {n for _, names in groups for n in names}
    for n in snaps[0]:
        if n not in level_names or n in groups[0][1]:  # others and the period-0 MLP never move
            assert torch.equal(snaps[0][n], snaps[-1][n]), n
    for c, names in groups[1:]:
        changed = [t for t in range(6) if any(not torch.equal(snaps[t + 1][n], snaps[t][n]) for n in names)]
        assert changed == [t for t in range(6) if (t + 1) % c == 0]


def test_accumulated_gradient_is_the_mean_of_the_chunk_with_sgd():
    model = tiny(layers=2)
    ref = copy.deepcopy(model)
    init = snapshot(model)
    lr, C = 0.5, 3
    method = make_method("cms", lr=lr, periods=[0, C], others="freeze", optimizer="sgd", weight_decay=0.0,
                         grad_clip=None)
    train(method, model, 2 * C)
    # by hand: level weights are fixed within a chunk, nothing else moves
    params = dict(ref.named_parameters())
    names = [n for n in params if n.startswith("model.layers.1.mlp.")]
    assert len(names) == 3
    for chunk in range(2):
        grads = {n: torch.zeros_like(params[n]) for n in names}
        for t in range(chunk * C, (chunk + 1) * C):
            gs = torch.autograd.grad(lm_loss_masked(ref, batch(t)), [params[n] for n in names])
            for n, g in zip(names, gs):
                grads[n] += g
        with torch.no_grad():
            for n in names:
                params[n] -= lr * grads[n] / C
    got = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n], params[n], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got[names[0]], init[names[0]])  # the level did move (down_proj: nonzero grad)
    for n, p in got.items():  # the frozen MLP and the others are untouched
        if n not in names:
            assert torch.equal(p, params[n]), n


def test_clipping_acts_once_on_the_chunk_mean():
    """The engine clips after the rule: on the update step it clips the mean of the chunk (the scale of
    one step's gradient), and on skipped steps there is nothing to clip."""
    model = tiny(layers=1)
    ref = copy.deepcopy(model)
    clip = 1e-4
    lr = 100.0
    method = make_method("cms", lr=lr, periods=[2], others="freeze", optimizer="sgd", weight_decay=0.0,
                         grad_clip=clip)
    train(method, model, 2)
    params = dict(ref.named_parameters())
    names = [n for n in params if ".mlp." in n]
    gs = [torch.autograd.grad(lm_loss_masked(ref, batch(t)), [params[n] for n in names]) for t in range(2)]
    mean = [(a + b) / 2 for a, b in zip(*gs)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in mean))
    assert norm > 100 * clip  # the clip is active
    got = dict(model.named_parameters())
    for n, g in zip(names, mean):
        torch.testing.assert_close(got[n] - params[n], -lr * g * clip / (norm + 1e-6), rtol=1e-3, atol=1e-7)


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="others"):
        make_method("cms", others="sometimes")
    with pytest.raises(ConfigError, match="periods"):
        make_method("cms", periods="fast")
    with pytest.raises(ConfigError, match="period"):
        make_method("cms", periods=[1, -2])
    with pytest.raises(ConfigError, match="decoder layers"):
        make_method("cms", periods=[1, 2]).setup(tiny(), MethodContext())
    with pytest.raises(ConfigError, match="holds no plain MLP"):
        make_method("cms", periods=[1, 2, 4]).setup(add_cms(tiny(), layers=[1], periods=[1, 2]), MethodContext())
    with pytest.raises(ConfigError, match="periods"):
        CMSConfig(periods=[1, 0])
    with pytest.raises(ConfigError, match="does not exist"):
        add_cms(tiny(), layers=[7])


# --------------------------------------------------------------------------- architecture
@pytest.mark.e2e
def test_add_cms_keeps_the_shipped_base_function():
    from forgetless.models.folder import default_model_dir, open_model

    model, tok = open_model(default_model_dir())
    ids = torch.tensor([tok.encode("The capital of France is Paris and the sea is")])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    mlp1 = model.model.layers[1].mlp
    add_cms(model, layers=[0, 1, 3], periods=[1, 4, 16], hidden=64)
    assert model.model.layers[1].mlp.levels[0] is mlp1  # level 1 is the pretrained MLP itself
    assert [c for c, _ in cms_levels(model)] == [1, 4, 16] * 3
    assert getattr(model.config, CMS_CONFIG_KEY) == {"layers": [0, 1, 3], "periods": [1, 4, 16], "hidden": 64}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="already has CMS"):
        add_cms(model, layers=[2])
    assert [c for c, _ in make_method("cms").levels(model)] == [1, 4, 16] * 3  # only the blocks' levels
    model2, _ = open_model(default_model_dir())
    with pytest.raises(ConfigError, match="product-key memory"):
        add_cms(model2, layers=[2])
    # default periods on the plain base: 1, 4, 16 by depth over the layers with a plain MLP (0, 1, 3)
    assert [(c, named[0][0]) for c, named in make_method("cms").levels(model2)] == [
        (1, "model.layers.0.mlp.gate_proj.weight"), (4, "model.layers.1.mlp.gate_proj.weight"),
        (16, "model.layers.3.mlp.gate_proj.weight")]


def test_continuum_mlp_is_the_residual_chain():
    torch.manual_seed(0)
    block = ContinuumMLP(4, 6, [1, 2, 4])
    with torch.no_grad():
        for lvl in block.levels:
            lvl.down_proj.weight.normal_()
    x = torch.randn(3, 4)
    h1 = x + block.levels[0](x)
    h2 = h1 + block.levels[1](h1)
    h3 = h2 + block.levels[2](h2)
    torch.testing.assert_close(block(x), h3 - x)


def test_save_load_round_trip_with_cms_and_memory(tmp_path):
    model = add_memory_layers(tiny(), layers=[2], config=MemoryConfig(n_keys=4, heads=1, knn=2, k_dim=8))
    add_cms(model, layers=[0, 1], periods=[1, 3], hidden=8)
    with torch.no_grad():
        for _, ps in cms_levels(model):
            for p in ps:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.model.layers[0].mlp, ContinuumMLP) and loaded.model.layers[1].mlp.periods == [1, 3]
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = batch(0)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert getattr(loaded.config, CMS_CONFIG_KEY)["periods"] == [1, 3]


def test_base_config_cms_section_builds_saves_and_loads(tmp_path):
    cfg = from_dict(ModelConfig, {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32,
                                  "max_len": 32, "cms": {"layers": [0], "periods": [1, 2, 8], "hidden": 8}})
    assert cfg.cms == CMSConfig(layers=[0], periods=[1, 2, 8], hidden=8)
    assert from_dict(ModelConfig, {}).cms is None  # default: plain MLPs, as before
    mem = MemorySection(layers=[1], n_keys=4, heads=1, knn=2, k_dim=8)
    net = build_base(cfg, mem, vocab_size=32, eos_id=0, pad_id=1)
    assert [c for c, _ in cms_levels(net)] == [1, 2, 8]
    save_model(net, tmp_path / "b")
    loaded = load_model(tmp_path / "b")
    assert [c for c, _ in cms_levels(loaded)] == [1, 2, 8]
    plain = build_base(from_dict(ModelConfig, {"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                               "intermediate_size": 32, "max_len": 32}), mem, 32, 0, 1)
    assert not cms_levels(plain) and not hasattr(plain.config, CMS_CONFIG_KEY)


# --------------------------------------------------------------------------- end to end
DOMAIN = """
  - name: domain
    stream: {kind: domain, experiences: 2, steps_per_experience: 2, batch_size: 4, seq_len: 64, test_docs: 4,
             eval_every: 0, general_tokens: 512}
    methods:
      - {name: cms, lr: 1.0e-4, periods: [1, 4, null, 4]}
"""
FACTS = """
  - name: facts
    stream: {kind: facts, experiences: 2, facts_per_experience: 2, steps_per_fact: 1, batch_size: 4,
             general_tokens: 512}
    methods:
      - {name: cms, lr: 1.0e-4, periods: {3: [1, 3]}}
"""
HEAD = "name: tiny-cms\nseed: 3\nexperiments:\n"


@pytest.mark.e2e
def test_forgetless_run_with_cms_end_to_end_and_resumed(tmp_path, quick_runs, interrupt_run):
    p = tmp_path / "run.yaml"
    p.write_text(HEAD + DOMAIN + FACTS)
    full = run(load_run_config(p), tmp_path / "full", progress=False, log=lambda s: None)
    for exp in ("domain", "facts"):
        m = full[exp]["methods"]["cms"]
        assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"])
        assert m["spec"]["method"] == "cms"
    # resume (facts stream only, to keep the test short): the MLPs of layers 1 and 3 (period 3) step at
    # the stream's step 2, with a chunk begun in experience 1, so the pending sums must survive the stop
    p.write_text(HEAD + FACTS)
    interrupt_run(lambda n, state_dir: n == 1)
    with pytest.raises(KeyboardInterrupt):
        run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    interrupt_run(None)
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "resumed" / "facts" / "cms" / "state" / run_mod.METHOD_STATE))
    assert int(state["step"][0]) == 2 and any(k.startswith("buf.model.layers.1.mlp.") for k in state)
    logs = []
    resumed = run(load_run_config(p), tmp_path / "resumed", progress=False, log=logs.append)
    assert any("resuming after experience 1 of 2" in line for line in logs)
    assert resumed["facts"]["methods"]["cms"]["R"] == full["facts"]["methods"]["cms"]["R"]
    assert resumed["facts"]["methods"]["cms"]["b"] == full["facts"]["methods"]["cms"]["b"]
