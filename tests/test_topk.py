"""The C++ top-k kernel of the product-key lookup (models/topk.py) against torch.topk, its reference."""

import copy

import pytest
import torch

from forgetless.models import topk as topk_module
from forgetless.models.memory import MemoryConfig, ProductKeyMemory
from forgetless.models.topk import kernel_available, topk, topk_indices


def test_the_kernel_is_built_on_this_machine():
    # set-up installs ninja and the machine has a C++ compiler: the comparisons below exercise the kernel
    assert kernel_available(), "the C++ top-k kernel did not build (g++ and the ninja package are needed)"


@pytest.mark.parametrize("shape,k", [((5, 7, 256), 32), ((3, 119), 32), ((4, 16), 16), ((6, 9), 1), ((2, 3, 40), 0)])
def test_indices_and_values_equal_torch_topk_on_random_rows(shape, k):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + k))
    ref = x.topk(k, dim=-1)
    vals, idx = topk(x, k)
    assert idx.dtype == torch.long and idx.shape == ref.indices.shape
    assert torch.equal(idx, ref.indices) and torch.equal(vals, ref.values)


def test_non_contiguous_input_and_ties():
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(0)).t()  # rows of 256, strided
    assert not x.is_contiguous() and torch.equal(topk_indices(x, 32), x.topk(32, dim=-1).indices)
    tied = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0]])
    assert topk_indices(tied, 4).tolist() == [[1, 2, 4, 3]]  # equal values: the lower index first
    assert torch.equal(topk(tied, 4)[0], tied.topk(4).values)


def test_gradients_flow_through_the_values_as_through_torch_topk():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(8, 10, generator=torch.Generator().manual_seed(2))
    (topk(x, 10)[0] * w).sum().backward()
    ours, x.grad = x.grad.clone(), None
    (x.topk(10, dim=-1).values * w).sum().backward()
    assert torch.equal(ours, x.grad)


def test_other_dtypes_and_the_switch_use_torch_topk(monkeypatch):
    x = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(topk_indices(x, 5), x.topk(5, dim=-1).indices)
    calls = []
    monkeypatch.setattr(topk_module, "_kernel", lambda t, k: calls.append(k) or t.topk(k, dim=-1).indices)
    topk_indices(x.float(), 5)
    assert calls == [5]
    monkeypatch.setenv(topk_module.ENV_VAR, "torch")
    topk_indices(x.float(), 5)
    assert calls == [5] and not kernel_available()


def test_the_lookup_is_unchanged_by_the_kernel(monkeypatch):
    """Several heads, padding-free random queries: indices exactly, scores, output and every gradient."""
    torch.manual_seed(0)
    mem = ProductKeyMemory(48, 48, MemoryConfig(n_keys=64, heads=4, knn=16, k_dim=32, v_dim=24))
    torch.nn.init.normal_(mem.values, std=0.1)  # the table starts at zero; make the output depend on it
    x = torch.randn(2, 9, 48)
    twin = copy.deepcopy(mem)  # a forward in training mode updates the query statistics: run each once

    def run(mem):
        mem.zero_grad(set_to_none=True)
        scores, idx = mem.lookup(x.reshape(-1, 48))
        out = mem(x)
        out.square().sum().backward()
        grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in mem.named_parameters()
                 if p.grad is not None}
        return scores.detach(), idx, out.detach(), grads

    fast = run(mem)
    monkeypatch.setenv(topk_module.ENV_VAR, "torch")
    ref = run(twin)
    assert torch.equal(fast[1], ref[1]) and torch.equal(fast[0], ref[0]) and torch.allclose(fast[2], ref[2])
    assert fast[3].keys() == ref[3].keys() and len(fast[3]) >= 3
    for name in ref[3]:
        assert torch.allclose(fast[3][name], ref[3][name], atol=1e-6), name
