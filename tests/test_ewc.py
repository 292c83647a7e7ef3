"""EWC: the penalty is zero at the anchor and quadratic around it; the Fisher matches a direct computation;
online EWC decays and sums; state survives a save/load round trip."""

from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_llama

from forgetless.methods import make_method
from forgetless.methods.base import MethodContext, lm_loss_masked
from forgetless.methods.ewc import empirical_fisher, quadratic_penalty


def tiny():
    return tiny_llama(positions=16)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (2, 8), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def test_empirical_fisher_matches_a_direct_computation():
    model = tiny()
    batches = [batch(1), batch(2), batch(3)]
    fisher = empirical_fisher(model, lm_loss_masked, batches)
    name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
    direct = torch.zeros_like(p)
    for b in batches:
        g, = torch.autograd.grad(lm_loss_masked(model, b), [p])
        direct += g ** 2
    torch.testing.assert_close(fisher[name], direct / 3)
    assert all(f.min() >= 0 for f in fisher.values())


def test_penalty_is_zero_at_the_anchor_and_quadratic_around_it():
    model = tiny()
    params = dict(model.named_parameters())
    anchor = {n: p.detach().clone() for n, p in params.items()}
    importance = {n: torch.rand_like(p) for n, p in params.items()}
    assert quadratic_penalty(model, [(importance, anchor)], lam=3.0).item() == 0.0
    delta = {n: torch.randn_like(p) * 0.01 for n, p in params.items()}
    want = 0.5 * 3.0 * sum((importance[n] * delta[n] ** 2).sum() for n in params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(anchor[n] + delta[n])
    one = quadratic_penalty(model, [(importance, anchor)], lam=3.0)
    assert one.item() == pytest.approx(want.item(), rel=1e-5)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(anchor[n] + 2 * delta[n])
    assert quadratic_penalty(model, [(importance, anchor)], lam=3.0).item() == pytest.approx(4 * one.item(), rel=1e-5)


@pytest.mark.parametrize("name,n_terms", [("ewc", 2), ("online_ewc", 1)])
def test_ewc_keeps_one_term_per_experience_or_one_decayed_term(name, n_terms):
    model = tiny()
    method = make_method(name, lr=1e-3, lam=10.0, fisher_batches=2)
    exp = SimpleNamespace(train_batch=batch, steps=4)
    for _ in range(2):
        model = method.setup(model, MethodContext())
        for s in range(2):
            method.loss(model, batch(s)).backward()
            method.optimizers()[0].step()
            method.optimizers()[0].zero_grad()
        model = method.export(model)
        method.after_experience(model, exp)
    assert len(method.terms) == n_terms
    # the penalty now pulls back: zero at the last anchor, positive after a move
    restored = make_method(name, lr=1e-3, lam=10.0)
    restored.load_state_tensors(method.state_tensors())
    assert len(restored.terms) == n_terms
    for (f1, a1), (f2, a2) in zip(method.terms, restored.terms):
        assert all(torch.equal(f1[n], f2[n]) and torch.equal(a1[n], a2[n]) for n in f1)
    if name == "online_ewc":
        assert quadratic_penalty(model, method.terms, 10.0).item() == 0.0
