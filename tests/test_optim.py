"""LazyAdam (row-sparse Adam of the value tables) and the fused AdamW choice, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from forgetless.training import optim
from forgetless.training.optim import LazyAdam, adamw


def sparse_rows(rows: list[int], grads: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), grads, shape).coalesce()


def reference_adam(p, m, v, g, step, lr, b1, b2, eps):
    """torch.optim.Adam's update of one row, written out."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    return p - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps), m, v


@pytest.mark.parametrize("share", [0.0, 1.0])  # 0.0: always the dense path; 1.0: always the gather path
def test_lazy_adam_updates_the_rows_read_like_adam_and_leaves_the_others(monkeypatch, share):
    monkeypatch.setattr(optim, "DENSE_PATH_SHARE", share)
    g = torch.Generator().manual_seed(0)
    n, d, lr, b1, b2, eps = 40, 8, 1e-2, 0.9, 0.99, 1e-8
    p = torch.nn.Parameter(torch.randn(n, d, generator=g, dtype=torch.float64).float())
    opt = LazyAdam([p], lr=lr, betas=(b1, b2), eps=eps)
    ref_p, ref_m, ref_v = p.detach().double().clone(), torch.zeros(n, d, dtype=torch.float64), \
        torch.zeros(n, d, dtype=torch.float64)
    for step, rows in enumerate(([1, 5, 7], [5, 9, 30, 39], [0, 1, 2, 3, 5]), start=1):
        vals = torch.randn(len(rows), d, generator=g)
        before = {k: t.clone() for k, t in (("p", p.detach()), *((k, opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq")
                                                                 if opt.state[p]))}
        p.grad = sparse_rows(rows, vals, (n, d))
        opt.step()
        r = torch.tensor(rows)
        ref_p[r], ref_m[r], ref_v[r] = reference_adam(ref_p[r], ref_m[r], ref_v[r], vals.double(), step, lr, b1, b2, eps)
        others = torch.tensor([i for i in range(n) if i not in rows])
        for k, t in before.items():  # rows not read: bit for bit unchanged
            now = p.detach() if k == "p" else opt.state[p][k]
            assert torch.equal(now[others], t[others]), k
        assert torch.allclose(p.detach().double(), ref_p, atol=1e-6, rtol=1e-5)
        assert torch.allclose(opt.state[p]["exp_avg"].double(), ref_m, atol=1e-6)
        assert float(opt.state[p]["step"]) == step


def test_lazy_adam_dense_and_gather_paths_give_the_same_bytes(monkeypatch):
    g = torch.Generator().manual_seed(1)
    init = torch.randn(64, 16, generator=g)
    grads = [sparse_rows(sorted(torch.randperm(64, generator=g)[:k].tolist()), torch.randn(k, 16, generator=g), (64, 16))
             for k in (50, 3, 20)]
    out = []
    for share in (0.0, 1.0):
        monkeypatch.setattr(optim, "DENSE_PATH_SHARE", share)
        p = torch.nn.Parameter(init.clone())
        opt = LazyAdam([p], lr=3e-3)
        for gr in grads:
            p.grad = gr
            opt.step()
        out.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_lazy_adam_state_dict_resumes_the_same_trajectory():
    g = torch.Generator().manual_seed(2)
    grads = [sparse_rows([1, 4, 6], torch.randn(3, 4, generator=g), (10, 4)) for _ in range(4)]
    p1 = torch.nn.Parameter(torch.ones(10, 4))
    o1 = LazyAdam([p1], lr=1e-2)
    for gr in grads:
        p1.grad = gr
        o1.step()
    p2 = torch.nn.Parameter(torch.ones(10, 4))
    o2 = LazyAdam([p2], lr=1e-2)
    for gr in grads[:2]:
        p2.grad = gr
        o2.step()
    p3 = torch.nn.Parameter(p2.detach().clone())
    o3 = LazyAdam([p3], lr=1e-2)
    o3.load_state_dict(o2.state_dict())
    for gr in grads[2:]:
        p3.grad = gr
        o3.step()
    assert torch.equal(p1.detach(), p3.detach())


def test_lazy_adam_takes_dense_gradients_and_rejects_bad_settings():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = LazyAdam([p], lr=0.1)
    p.grad = torch.ones(3, 2)
    opt.step()
    assert torch.all(p.detach() < 0)  # every row moved against the gradient
    with pytest.raises(ValueError):
        LazyAdam([p], lr=-1.0)


def test_adamw_uses_the_fused_kernel_on_float_cpu_parameters():
    w = torch.nn.Linear(4, 4)
    assert adamw(w.parameters(), lr=1e-3).defaults["fused"] is True
    assert adamw([{"params": [w.weight]}, {"params": [w.bias], "weight_decay": 0.0}], lr=1e-3).defaults["fused"]
    assert not adamw(w.parameters(), lr=1e-3, foreach=False).defaults.get("fused")  # an explicit choice wins
