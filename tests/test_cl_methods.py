"""Core mathematics of the issue-5 methods on tiny real tensors: SI, MAS, the sampled Fisher,
A-GEM's projection, the distillation KLs, generative and background replay, continual backprop."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_llama

from forgetless.errors import ConfigError, DataSourceError
from forgetless.methods import make_method
from forgetless.methods.agem import agem_project
from forgetless.methods.base import MethodContext, lm_loss_masked
from forgetless.methods.distill import kl_per_position, masked_kl
from forgetless.methods.ewc import sampled_fisher
from forgetless.methods.mas import mas_importance
from forgetless.methods.plasticity import ContinualBackprop, gated_mlps
from forgetless.methods.regularization import quadratic_penalty
from forgetless.methods.si import si_importance
from forgetless.training import Experience, fit_experience


def tiny(seed=0):
    return tiny_llama(seed=seed, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def batch(seed, n=2, t=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 32, (n, t), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def experience(steps=4):
    return SimpleNamespace(train_batch=batch, steps=steps, name="e")


def train(method, model, steps=3):
    """``steps`` steps on ``batch(0..steps-1)``: one experience through the one lifecycle."""
    return fit_experience(method, model, MethodContext(tokenizer=TinyTok()), Experience("e", batch, steps),
                          progress=False).model


class TinyTok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 29) for c in text]}

    def decode(self, ids):
        return " ".join(map(str, ids.tolist()))


# --------------------------------------------------------------------------- SI
def test_si_importance_is_the_normalised_path_integral():
    omega = {"w": torch.tensor([2.0, -1.0, 0.5])}
    start, end = {"w": torch.tensor([0.0, 0.0, 1.0])}, {"w": torch.tensor([1.0, 2.0, 1.0])}
    got = si_importance(omega, start, end, xi=0.1)["w"]
    torch.testing.assert_close(got, torch.tensor([2.0 / 1.1, 0.0, 0.5 / 0.1]))


def test_si_accumulates_minus_gradient_times_update_over_the_steps():
    model = tiny()
    method = make_method("si", lr=1e-2, lam=1.0, xi=1e-3)
    model = method.setup(model, MethodContext())
    name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
    want = torch.zeros_like(p)
    for s in range(3):
        before = p.detach().clone()
        method.loss(model, batch(s)).backward()
        g = p.grad.detach().clone()
        method.after_backward(model, s)
        method.optimizers()[0].step()
        method.optimizers()[0].zero_grad(set_to_none=True)
        method.after_step(model, s)
        want -= g * (p.detach() - before)
    torch.testing.assert_close(method._omega[name], want)
    method.after_experience(model, experience())
    omega, anchor = method.terms[0]
    torch.testing.assert_close(omega[name], want.clamp_min(0) / ((p.detach() - method._start[name]) ** 2 + 1e-3))
    assert quadratic_penalty(model, method.terms, 1.0).item() == 0.0  # zero at the anchor
    # SI's importances add up over experiences (one cumulative term)
    train(method, model)
    assert len(method.terms) == 1


# --------------------------------------------------------------------------- MAS
def test_mas_importance_matches_a_direct_computation_and_needs_no_labels():
    model = tiny()
    batches = [batch(1), batch(2)]
    got = mas_importance(model, batches)
    name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("up_proj.weight"))
    want = torch.zeros_like(p)
    for b in batches:
        out = model(input_ids=b["input_ids"]).logits
        g, = torch.autograd.grad((out ** 2).sum(-1).mean(), [p])
        want += g.abs()
    torch.testing.assert_close(got[name], want / 2)
    nolabels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    torch.testing.assert_close(mas_importance(model, nolabels)[name], got[name])


def test_mas_method_keeps_one_cumulative_term():
    method = make_method("mas", lr=1e-3, lam=2.0, mas_batches=2)
    model = train(method, tiny())
    first = {n: w.clone() for n, w in method.terms[0][0].items()}
    train(method, model)
    assert len(method.terms) == 1
    assert all((method.terms[0][0][n] >= first[n] - 1e-12).all() for n in first)  # gamma = 1: they add up


# --------------------------------------------------------------------------- EWC: sampled Fisher
def test_sampled_fisher_uses_labels_drawn_from_the_model():
    model = tiny()
    batches = [batch(1), batch(2)]
    f1, f2 = sampled_fisher(model, batches, seed=0), sampled_fisher(model, batches, seed=0)
    assert all(torch.equal(f1[n], f2[n]) for n in f1)  # seeded
    name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
    # direct: draw the same labels, square the gradient of their NLL
    g = torch.Generator().manual_seed(0)
    direct = torch.zeros_like(p)
    for b in batches:
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"]).logits[:, :-1]
            draw = torch.multinomial(logits.softmax(-1).reshape(-1, 32), 1, generator=g).view(2, 7)
        labels = b["labels"].clone()
        labels[:, 1:] = draw
        grad, = torch.autograd.grad(lm_loss_masked(model, {**b, "labels": labels}), [p])
        direct += grad ** 2
    torch.testing.assert_close(f1[name], direct / 2)
    with pytest.raises(ConfigError):
        make_method("ewc", fisher="exact")


# --------------------------------------------------------------------------- A-GEM
def test_agem_projection_has_a_non_negative_dot_product_with_the_reference():
    g_ref = torch.tensor([1.0, 0.0, 1.0])
    g = torch.tensor([-2.0, 1.0, 0.0])
    p = agem_project(g, g_ref)
    torch.testing.assert_close(p, torch.tensor([-1.0, 1.0, 1.0]))  # g - (-2 / 2) g_ref
    assert torch.dot(p, g_ref).item() == pytest.approx(0.0, abs=1e-6)
    ok = torch.tensor([1.0, 5.0, -0.5])
    assert agem_project(ok, g_ref) is ok  # already non-negative: unchanged
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, b = torch.randn(20, generator=gen), torch.randn(20, generator=gen)
        assert torch.dot(agem_project(a, b), b) >= -1e-5


def test_agem_memory_holds_only_finished_experiences_and_projects():
    method = make_method("agem", lr=1e-2, buffer_size=8, ref_size=2)
    model = train(method, tiny())
    assert method.projected == 0 and len(method.memory.items) == 6  # filled at the end of experience 1
    model = method.setup(model, MethodContext())
    fixed = method.memory.items[:2]
    method.memory.sample = lambda n: fixed  # a known reference batch
    from forgetless.data.batches import pad_rows
    params = list(model.parameters())
    g_ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lm_loss_masked(model, pad_rows(fixed, 0)), params)])
    for s in range(20):  # find a batch whose gradient opposes the memory's
        model.zero_grad(set_to_none=True)
        method.loss(model, batch(100 + s)).backward()
        g = torch.cat([p.grad.reshape(-1).clone() for p in params])
        if torch.dot(g, g_ref) < 0:
            break
    assert torch.dot(g, g_ref) < 0
    method.after_backward(model, 0)
    g_after = torch.cat([p.grad.reshape(-1) for p in params])
    assert method.projected == 1
    assert torch.dot(g_after, g_ref).item() == pytest.approx(0.0, abs=1e-5 * g_ref.norm().item() * g.norm().item())
    torch.testing.assert_close(g_after, agem_project(g, g_ref))
    ref_rows = method.memory.items
    state = method.state_tensors()
    again = make_method("agem", lr=1e-2, buffer_size=8, ref_size=2)
    again.load_state_tensors(state)
    assert len(again.memory.items) == len(ref_rows)


# --------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_is_zero_for_identical_models_and_positive_otherwise(direction):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert masked_kl(a, a, torch.ones(2, 5), direction, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_kl(a, b, torch.ones(2, 5), direction, 2.0).item() > 0
    p, q = a[0, 0].softmax(-1), b[0, 0].softmax(-1)
    want = (p * (p / q).log()).sum() if direction == "reverse" else (q * (q / p).log()).sum()
    assert kl_per_position(a, b, direction)[0, 0].item() == pytest.approx(want.item(), rel=1e-5)


def test_forward_and_reverse_kl_differ_and_mask_selects_positions():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 3, 7, generator=g), torch.randn(1, 3, 7, generator=g)
    fwd, rev = kl_per_position(a, b, "forward"), kl_per_position(a, b, "reverse")
    assert not torch.allclose(fwd, rev)
    mask = torch.tensor([[1, 0, 0]])
    assert masked_kl(a, b, mask, "forward", 1.0).item() == pytest.approx(fwd[0, 0].item(), rel=1e-6)


@pytest.mark.parametrize("name,opts", [("lwf", {}), ("distill", {"kl": "reverse", "inputs": "replay", "replay_size": 2})])
def test_distillation_loss_equals_the_task_loss_at_the_teacher(name, opts):
    model = tiny()
    method = make_method(name, lr=1e-3, **opts)
    model = method.setup(model, MethodContext())
    b = batch(5)
    if opts.get("inputs") == "replay":
        method.loss(model, batch(6))  # fill the buffer
    # the student is the teacher at the start of an experience: the KL term vanishes
    assert method.loss(model, b).item() == pytest.approx(lm_loss_masked(model, b).item(), rel=1e-5)
    with pytest.raises(ConfigError):
        make_method("distill", kl="sideways")


# --------------------------------------------------------------------------- generative replay
def test_generative_replay_replays_model_samples_not_stored_data():
    model = tiny()
    method = make_method("generative_replay", lr=1e-3, samples=4, prompt_tokens=2, max_tokens=8, ratio=1.0)
    train(method, model)
    items = method.buffer.items
    assert len(items) == 4 and all(x.numel() == 8 for x, _ in items)
    real = [batch(s)["input_ids"][i] for s in range(4) for i in range(2)]
    assert all(any(torch.equal(x[:2], r[:2]) for r in real) for x, _ in items)  # prompts are real prefixes
    assert not any(torch.equal(x, r) for x, _ in items for r in real)  # the rest is generated
    n_before = method.buffer.seen
    method.loss(model, batch(9))
    assert method.buffer.seen == n_before  # real batches never enter the buffer


# --------------------------------------------------------------------------- background replay
def test_background_replay_draws_windows_of_pretraining_text(tmp_path):
    f = tmp_path / "bg.jsonl"
    f.write_text("".join(json.dumps({"text": "the quick brown fox " * 5}) + "\n" for _ in range(4)))
    method = make_method("replay", lr=1e-3, source="background", background_file=str(f), ratio=1.0)
    method.setup(tiny(), MethodContext(tokenizer=TinyTok()))
    rows = [(torch.arange(3, 9), torch.arange(3, 9))] * 2
    replayed = method.replay_rows(rows)
    assert len(replayed) == 2 and all(x.numel() == 6 for x, _ in replayed)
    stream = method._background.tolist()
    assert all(any(stream[i:i + 6] == x.tolist() for i in range(len(stream))) for x, _ in replayed)
    assert method.buffer.seen == 0  # background-only replay keeps no stream data
    both = make_method("replay", lr=1e-3, source="both", background_file=str(f), ratio=1.0)
    both.setup(tiny(), MethodContext(tokenizer=TinyTok()))
    both.replay_rows(rows)
    assert len(both.replay_rows(rows)) == 2 and both.buffer.seen == 4
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataSourceError):
        make_method("replay", source="background", background_file=str(tmp_path / "empty.jsonl")).setup(
            tiny(), MethodContext(tokenizer=TinyTok()))


# --------------------------------------------------------------------------- continual backprop
def test_continual_backprop_replaces_the_lowest_utility_mature_units():
    model = tiny()
    mlp = gated_mlps(model)["model.layers.0.mlp"]
    cbp = ContinualBackprop(rate=0.1, maturity=2, decay=0.0)
    cbp.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        mlp.down_proj.weight[:, 5] = 0.0  # unit 5 contributes nothing: the least useful
    model(input_ids=batch(0)["input_ids"])
    gate_before = mlp.gate_proj.weight.detach().clone()
    assert cbp.replace_units([opt], 0) == 0 and cbp.replace_units([opt], 1) == 0  # not mature yet
    model(input_ids=batch(0)["input_ids"])
    replaced = cbp.replace_units([opt], 2)  # 32 mature units x 0.1 = 3 replacements
    assert replaced == 3
    changed = (mlp.gate_proj.weight != gate_before).any(1).nonzero().flatten().tolist()
    assert 5 in changed and len(changed) == 3
    assert (mlp.down_proj.weight[:, changed] == 0).all()  # outgoing weights zeroed: no jump in function
    assert (cbp.age["model.layers.0.mlp"][changed] == 0).all()
    cbp.detach()
    with pytest.raises(ConfigError):
        make_method("full", continual_backprop={"rate": 2.0})
    m = make_method("ewc", continual_backprop=True)
    assert [p.name for p in m.plugins] == ["continual_backprop"] and m.describe()["plugins"][0]["rate"] == 1e-4
    m = make_method("ewc", plugins=[{"name": "continual_backprop", "rate": 1e-3}])
    assert m.plugins[0].rate == 1e-3
    with pytest.raises(ConfigError):
        make_method("ewc", plugins=[{"name": "no_such_plugin"}])


def test_replay_buffer_size_in_tokens():
    method = make_method("replay", lr=1e-3, buffer_tokens=40, ratio=0.5)
    rows = [(torch.arange(3, 13), torch.arange(3, 13))] * 4  # 10 tokens each: capacity 4 sequences
    method.replay_rows(rows)
    method.replay_rows(rows)
    assert method.buffer.capacity == 4 and len(method.buffer.items) == 4


TINY_RUN = """
name: tiny-methods
seed: 1
experiments:
  - name: domain
    stream: {kind: domain, experiences: 2, steps_per_experience: 2, batch_size: 4, seq_len: 32, test_docs: 3,
             eval_every: 0, general_tokens: 256}
    methods:
      - {name: si, lr: 1.0e-4, lam: 1.0e+4}
      - {name: mas, lr: 1.0e-4, lam: 0.03, mas_batches: 1}
      - {name: replay, label: replay_background, lr: 1.0e-4, source: background}
      - {name: generative_replay, lr: 1.0e-4, samples: 4, max_tokens: 16}
      - {name: agem, lr: 1.0e-4, ref_size: 2}
      - {name: lwf, lr: 1.0e-4}
      - {name: distill, label: kl_reverse, lr: 1.0e-4, kl: reverse, inputs: replay, replay_size: 2}
      - {name: full, label: full_cbp, lr: 1.0e-4, continual_backprop: {rate: 0.01, maturity: 0}}
  - name: facts
    stream: {kind: facts, experiences: 2, facts_per_experience: 1, steps_per_fact: 1, batch_size: 4, eval_every: 0,
             questions: true}
    methods:
      - {name: generative_replay, lr: 1.0e-4, samples: 4, max_tokens: 16}
      - {name: agem, lr: 1.0e-4, ref_size: 2}
"""


@pytest.mark.e2e
def test_every_new_method_runs_on_the_domain_and_fact_streams_and_resumes(tmp_path, quick_runs, interrupt_run):
    from forgetless.experiments.runner import load_run_config, run

    p = tmp_path / "run.yaml"
    p.write_text(TINY_RUN)
    full = run(load_run_config(p), tmp_path / "full", progress=False, log=lambda s: None)
    for exp in ("domain", "facts"):
        for label, m in full[exp]["methods"].items():
            assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"]), label
    # interrupt the continual-backprop run after its first experience: its state (utilities, ages) resumes
    # the resumed run holds only the two methods with the most state; a method's R depends only on the stream and itself
    small = TINY_RUN.split("  - name: facts")[0].split("    methods:")[0] + """    methods:
      - {name: agem, lr: 1.0e-4, ref_size: 2}
      - {name: full, label: full_cbp, lr: 1.0e-4, continual_backprop: {rate: 0.01, maturity: 0}}
"""
    p.write_text(small)
    interrupt_run(lambda n, state_dir: state_dir.parent.name == "full_cbp")
    with pytest.raises(KeyboardInterrupt):
        run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    interrupt_run(None)
    resumed = run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    for label in ("agem", "full_cbp"):
        assert resumed["domain"]["methods"][label]["R"] == full["domain"]["methods"][label]["R"], label
    plugins = resumed["domain"]["methods"]["full_cbp"]["method"]["plugins"]  # describe(): plugins with their options
    assert [p["name"] for p in plugins] == ["continual_backprop"] and plugins[0]["rate"] == 0.01
