"""Model merging: the merge rules on hand-made tensors (task arithmetic, TIES sign election and
disjoint mean, DARE drop-and-rescale, Localize-and-Stitch masks and overlap averaging, learned
masks), and the ``merge`` method end to end in ``forgetless run`` with resume."""

import pytest
import torch
from torch import nn

import forgetless.experiments.runner as run_mod
from forgetless.errors import ConfigError
from forgetless.experiments.runner import load_run_config, run
from forgetless.methods import make_method
from forgetless.methods.merging import rules as M


def T(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_task_vector_and_task_arithmetic_weighted_sum():
    base = {"a": T(1, 1), "b": T(0, 0, 0)}
    e1 = {"a": T(2, 0), "b": T(1, 2, 3), "extra": T(9)}
    e2 = {"a": T(1, 3), "b": T(-1, 0, 1)}
    t1, t2 = M.task_vector(e1, base), M.task_vector(e2, base)
    assert set(t1) == {"a", "b"} and t1["a"].tolist() == [1, -1]
    d = M.task_arithmetic([t1, t2], [0.5, 2.0])
    assert d["a"].tolist() == [0.5 * 1 + 2 * 0, 0.5 * -1 + 2 * 2]
    assert d["b"].tolist() == [0.5 - 2, 1.0, 1.5 + 2]
    assert M.apply_delta(base, d, 2.0)["a"].tolist() == [2.0, 8.0]
    with pytest.raises(ConfigError, match="weights"):
        M.task_arithmetic([t1, t2], [1.0])


def test_ties_trims_elects_sign_by_mass_and_takes_the_disjoint_mean():
    taus = [{"w": T(3, -1, 0.5, -4)}, {"w": T(-2, 2, 0.1, 1)}, {"w": T(1, -3, -0.2, 2)}]
    # density 0.5: keep 2 of 4 per task -> [3,0,0,-4], [-2,2,0,0], [0,-3,0,2]; mass [1,-1,0,-2] -> signs + - + -
    # entry 0: only 3 agrees; 1: only -3; 2: nothing kept; 3: only -4
    assert M.ties(taus, [1, 1, 1], 0.5)["w"].tolist() == [3, -3, 0, -4]
    assert M.ties(taus, [0.5, 0.5, 0.5], 0.5)["w"].tolist() == [1.5, -1.5, 0, -2]
    # mass vs count: +5 against two -1 -> "total" elects +, "frequency" elects -
    taus = [{"w": T(5, 1)}, {"w": T(-1, 3)}, {"w": T(-1, 2)}]
    assert M.ties(taus, None, 1.0)["w"].tolist() == [5, 2]
    assert M.ties(taus, None, 1.0, sign="frequency")["w"].tolist() == [-1, 2]
    # two agreeing entries: their (weighted) mean, not their sum
    taus = [{"w": T(2, -6)}, {"w": T(4, 1)}]
    assert M.ties(taus, [1.0, 0.5], 1.0)["w"].tolist() == [(2 + 2) / 2, -6]
    assert M.magnitude_prune([{"w": T(3, -1, 0.5, -4)}], [2.0], 0.5)["w"].tolist() == [6, 0, 0, -8]


def test_dare_rescales_kept_entries_and_keeps_the_expected_fraction():
    n = 200_000
    tau = {"w": torch.full((n,), 2.0)}
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    d = M.dare([tau], [1.0], 0.3, seed=7)["w"]
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    kept = d != 0
    assert torch.allclose(d[kept], torch.tensor(2.0 / 0.3))  # 1 / (1 - p) with p = 0.7
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert abs(d.mean().item() - 2.0) < 0.05  # unbiased in expectation
    assert torch.equal(M.dare([tau], [1.0], 0.3, seed=7)["w"], d)
    assert not torch.equal(M.dare([tau], [1.0], 0.3, seed=8)["w"], d)
    # two tasks +1 and -3 at keep 0.5: kept values 2 and -6
    taus = [{"w": torch.full((n,), 1.0)}, {"w": torch.full((n,), -3.0)}]
    lin = M.dare(taus, [1, 1], 0.5, seed=0)["w"]
    assert set(lin.unique().tolist()) == {-6.0, -4.0, 0.0, 2.0}
    tie = M.dare(taus, [1, 1], 0.5, seed=0, ties_sign="total")["w"]
    assert set(tie.unique().tolist()) == {-6.0, 0.0, 2.0}  # both kept: sign -, mean of agreeing = -6
    frac = {v: (tie == v).float().mean().item() for v in (-6.0, 0.0, 2.0)}
    assert abs(frac[2.0] - 0.25) < 0.01 and abs(frac[0.0] - 0.25) < 0.01 and abs(frac[-6.0] - 0.5) < 0.01
    assert torch.equal((lin == 0), (tie == 0))  # same seed, same drops


def test_dataless_masks_global_and_per_tensor():
    tau = {"a": T(5, 0.1, -0.2, 0.3), "b": T(4, -3, 2, 0.01)}
    g = M.dataless_masks([tau], 0.5, "global")[0]
    assert g["a"].tolist() == [True, False, False, False] and g["b"].tolist() == [True, True, True, False]
    t = M.dataless_masks([tau], 0.5, "tensor")[0]
    assert t["a"].tolist() == [True, False, False, True] and t["b"].tolist() == [True, True, False, False]
    assert g["a"].dtype == torch.bool
    with pytest.raises(ConfigError, match="scope"):
        M.dataless_masks([tau], 0.5, "layer")


def test_stitch_averages_overlapping_masks():
    base = {"w": torch.full((4,), 10.0)}
    taus = [{"w": T(1, 2, 3, 4)}, {"w": T(10, 20, 30, 40)}]
    masks = [{"w": torch.tensor([True, True, False, False])}, {"w": torch.tensor([False, True, True, False])}]
    assert M.stitch_delta(taus, masks)["w"].tolist() == [1, (2 + 20) / 2, 30, 0]
    assert M.stitch(base, taus, masks)["w"].tolist() == [11, 21, 40, 10]


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x @ self.w


def test_learned_mask_finds_the_useful_entries_and_is_binary_at_the_density():
    model = _Linear()
    base = {"w": torch.zeros(4)}
    tau = {"w": T(3, 2, 0.1, 0.1)}
    target = T(0, 2, 0.1, 0)  # entry 0 of tau hurts, entry 2 helps, entry 3 hurts
    batch = {"x": torch.eye(4), "y": target}

    def loss_fn(f, b):
        return ((f(b["x"]) - b["y"]) ** 2).sum()

    init = M.dataless_masks([tau], 0.5)[0]
    assert init["w"].tolist() == [True, True, False, False]  # by magnitude
    mask = M.learn_mask(model, base, tau, init, [batch], loss_fn, 0.5, steps=40, lr=0.3, l1=1e-3)
    assert mask["w"].dtype == torch.bool and int(mask["w"].sum()) == 2
    assert mask["w"].tolist() == [False, True, True, False]
    assert model.w.detach().abs().sum() == 0  # the model's own parameters are untouched
    mask0 = M.learn_mask(model, base, tau, init, [batch], loss_fn, 0.5, steps=0)
    assert torch.equal(mask0["w"], init["w"])  # no steps: the dataless mask
    none = {"w": torch.zeros(4, dtype=torch.bool)}  # all logits tie at -1: the larger |tau| wins
    assert M.learn_mask(model, base, {"w": T(0.1, -5, 0.2, 3)}, none, [batch], loss_fn, 0.5,
                        steps=0)["w"].tolist() == [False, True, False, True]


def test_learned_mask_on_a_tiny_llama_keeps_the_requested_density():
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetless.methods.base import lm_loss_masked

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tau = {n: 0.01 * torch.randn_like(p) for n, p in base.items()}
    x = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    init = M.dataless_masks([tau], 0.1)[0]
    mask = M.learn_mask(model, base, tau, init, [batch], lm_loss_masked, 0.1, steps=3, lr=0.5)
    n = sum(t.numel() for t in tau.values())
    assert all(m.dtype == torch.bool for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.1 * n)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


class _Exp:
    def __init__(self, seed):
        self.seed = seed

    def valid_batch(self, i):
        x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(self.seed * 100 + i))
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


@pytest.mark.parametrize("how", ["task_arithmetic", "ties", "dare", "dare_ties", "stitch", "stitch_learned"])
def test_merge_method_exports_base_plus_the_chosen_scaling_of_the_merge(how):
    from forgetless.methods.base import MethodContext, lm_loss_masked

    torch.manual_seed(0)
    model = _tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = make_method(how, lr=1e-2, lambdas=[0.0, 0.5, 1.0], valid_batches=2, density=0.3, mask_steps=2)
    exps, ctx = [_Exp(1), _Exp(2)], MethodContext()
    for k, e in enumerate(exps):
        ctx.experience, ctx.experience_index, ctx.seen_experiences = e, k, exps[: k + 1]
        model = method.setup(model, ctx)
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())  # every expert from the base
        for step in range(2):
            method.loss(model, e.valid_batch(10 + step)).backward()
            method.optimizers()[0].step()
            method.optimizers()[0].zero_grad()
        model = method.export(model)
    assert len(method.taus) == 2 and len(method.history) == 2
    h = method.history[-1]
    assert h["lambda"] == float(min(h["valid_loss"], key=h["valid_loss"].get)) and h["lambda"] in (0.0, 0.5, 1.0)
    delta = method.merged_delta()
    for n, p in model.named_parameters():
        assert torch.allclose(p, base[n] + h["lambda"] * delta[n], atol=1e-6), n
    with torch.no_grad():  # the recorded validation loss is the mean loss of the exported model
        want = sum(sum(float(lm_loss_masked(model, e.valid_batch(i))) for i in range(2)) / 2 for e in exps) / 2
    assert h["valid_loss"][str(h["lambda"])] == pytest.approx(want, rel=1e-5)
    if how == "stitch_learned":
        assert len(method.masks) == 2
    again = make_method(how, lr=1e-2, lambdas=[0.0, 0.5, 1.0], valid_batches=2, density=0.3, mask_steps=2)
    again.load_state_tensors(method.state_tensors())
    assert again.history == method.history
    assert all(torch.equal(again.merged_delta()[n], d) for n, d in delta.items())  # DARE: same seed, same drops


def test_merge_options_are_checked():
    assert make_method("ties").density == 0.2 and make_method("merge").how == "task_arithmetic"
    assert make_method("merge", how="dare_ties", density=0.5).density == 0.5
    with pytest.raises(ConfigError, match="'how'"):
        make_method("merge", how="slerp")
    with pytest.raises(ConfigError, match="density"):
        make_method("merge", density=1.5)
    with pytest.raises(ConfigError, match="unknown config key 'ties.how'"):
        make_method("ties", how="dare")


DOMAIN = """
  - name: domain
    stream: {kind: domain, experiences: 2, steps_per_experience: 2, batch_size: 4, seq_len: 64, test_docs: 4,
             eval_every: 0, general_tokens: 512}
    methods:
"""
STITCH = "      - {name: stitch_learned, lr: 1.0e-3, lambdas: [0.5, 1.0], valid_batches: 1, density: 0.05, mask_steps: 2}\n"
TINY = ("name: tiny\nseed: 1\nexperiments:" + DOMAIN + STITCH + """
  - name: facts
    stream: {kind: facts, experiences: 2, facts_per_experience: 2, steps_per_fact: 1, batch_size: 4, eval_every: 0}
    methods:
      - {name: merge, how: task_arithmetic, lr: 1.0e-3, lambdas: [0.5, 1.0], valid_batches: 2}
""")
RESUME = "name: tiny\nseed: 1\nexperiments:" + DOMAIN + STITCH  # same stream and stitch_learned options


@pytest.mark.e2e
def test_merge_runs_end_to_end_and_resumes_to_the_same_matrix(tmp_path, quick_runs, interrupt_run):
    from safetensors.torch import load_file

    from forgetless.models.checkpoint import load_model

    p = tmp_path / "run.yaml"
    p.write_text(TINY)
    full = run(load_run_config(p), tmp_path / "full", progress=False, log=lambda s: None)
    for exp in ("domain", "facts"):
        for label, m in full[exp]["methods"].items():
            assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"]), (exp, label)

    # the saved model after experience 2 is base + lambda * (tau_1 + tau_2) with the recorded lambda
    state = tmp_path / "full" / "facts" / "merge" / "state"
    st = load_file(str(state / run_mod.METHOD_STATE))
    lam = st["history.lambda"].tolist()
    assert len(lam) == 2 and all(x in (0.5, 1.0) for x in lam)
    losses = st["history.valid_loss"]
    assert losses.shape == (2, 2) and [0.5, 1.0][int(losses[1].argmin())] == lam[1]
    saved = dict(load_model(state / "model").named_parameters())
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        want = st[f"base_param.{n}"] + lam[1] * (st[f"tau.0.{n}"] + st[f"tau.1.{n}"])
        assert torch.allclose(saved[n], want, atol=1e-6)
        assert st[f"tau.0.{n}"].abs().sum() > 0 and st[f"tau.1.{n}"].abs().sum() > 0
    stitched = load_file(str(tmp_path / "full" / "domain" / "stitch_learned" / "state" / run_mod.METHOD_STATE))
    n_all = sum(v.numel() for k, v in stitched.items() if k.startswith("tau.0."))
    for k in (0, 1):
        assert sum(int(v.sum()) for n, v in stitched.items() if n.startswith(f"mask.{k}.")) == round(0.05 * n_all)
    assert any(k.startswith("base_buffer.") and k.endswith("q_whitener") for k in stitched)  # kept, not merged
    assert not any(k.startswith("tau.") and k.rsplit(".", 1)[-1].startswith("q_") for k in stitched)

    p.write_text(RESUME)
    interrupt_run(lambda n, state_dir: n == 1)  # interrupted right after the first experience
    with pytest.raises(KeyboardInterrupt):
        run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    interrupt_run(None)
    logs = []
    resumed = run(load_run_config(p), tmp_path / "resumed", progress=False, log=logs.append)["domain"]
    assert any("stitch_learned: resuming after experience 1 of 2" in line for line in logs)
    assert resumed["methods"]["stitch_learned"]["R"] == full["domain"]["methods"]["stitch_learned"]["R"]
    assert resumed["methods"]["stitch_learned"]["b"] == full["domain"]["methods"]["stitch_learned"]["b"]
