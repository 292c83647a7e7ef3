"""The compiled product-key top-k (forgetless.models.native) against the PyTorch reference."""

import shutil

import pytest
import torch

import forgetless.models.native as native
from forgetless.errors import ConfigError
from forgetless.models.memory import MemoryConfig, ProductKeyMemory, candidate_pairs

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler on this machine")


def canonical(scores: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row ordered by score (descending), equal scores by slot (ascending)."""
    order = slots.argsort(dim=-1)
    scores, slots = scores.gather(-1, order), slots.gather(-1, order)
    order = (-scores).argsort(dim=-1, stable=True)
    return scores.gather(-1, order), slots.gather(-1, order)


def boundary_ties(s: torch.Tensor, k: int) -> torch.Tensor:
    """Rows (tokens, heads) whose k-th and (k+1)-th best pair sums are equal: there either
    selection may keep a different one of the tied slots."""
    v, _ = s.topk(k, dim=-1)
    sums = (v[:, :, 0, :, None] + v[:, :, 1, None, :]).flatten(2)
    top = sums.topk(min(k + 1, sums.shape[-1]), dim=-1).values
    return top[..., k - 1] == top[..., -1] if top.shape[-1] > k else torch.zeros(top.shape[:2], dtype=torch.bool)


def selections(mem: ProductKeyMemory, x: torch.Tensor, monkeypatch):
    """(compiled, reference) lookups of x, each (scores, slots)."""
    got = mem.lookup(x)
    with monkeypatch.context() as m:
        m.setenv(native.NATIVE_ENV, "0")
        ref = mem.lookup(x)
    return got, ref


@pytest.mark.parametrize("n_keys,heads,knn", [(256, 4, 32), (64, 1, 8), (16, 3, 16), (128, 2, 5)])
def test_compiled_selection_equals_the_reference(monkeypatch, n_keys, heads, knn):
    torch.manual_seed(n_keys + heads + knn)
    cfg = MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=32, query_norm="layernorm")
    mem = ProductKeyMemory(24, 24, cfg).eval()
    x = torch.randn(600, 24)
    with torch.no_grad():
        (gs, gi), (rs, ri) = selections(mem, x, monkeypatch)
        s = torch.einsum("nhsd,hskd->nhsk", mem._queries(x), mem.sub_keys.float())
    assert native.kernel_status() == "compiled"
    assert gs.shape == rs.shape == (600, heads, knn) and gi.dtype == ri.dtype == torch.int64
    # the scores are the same sums bit for bit, best first, and each is its slot's score
    assert torch.equal(gs, rs)
    rows, cols = gi // n_keys, gi % n_keys
    assert torch.equal(gs, s[:, :, 0].gather(-1, rows) + s[:, :, 1].gather(-1, cols))
    # the slots are the same except where a tie at the k-th place lets either one in
    (cg, ci), (cr, cri) = canonical(gs, gi), canonical(rs, ri)
    tied = boundary_ties(s, knn)
    assert torch.equal(ci[~tied], cri[~tied]) and tied.float().mean() < 0.01
    assert (gi.sort(-1).values.diff(dim=-1) > 0).all()  # distinct slots per head


def test_compiled_selection_breaks_ties_towards_lower_indices():
    k, n = 8, 32
    pi, pj = candidate_pairs(k)
    scores, slots = native.product_topk(torch.zeros(3, 2, 2, n), k, pi, pj)
    assert torch.equal(slots, torch.arange(k).expand(3, 2, k))  # row 0, columns 0..k-1
    assert torch.equal(scores, torch.zeros(3, 2, k))


def test_nan_scores_and_other_inputs_fall_back_to_the_reference(monkeypatch):
    pi, pj = candidate_pairs(4)
    s = torch.randn(5, 2, 2, 16)
    s[3, 1, 0, 7] = float("nan")
    assert native.product_topk(s, 4, pi, pj) is None  # a NaN anywhere: the caller uses the reference
    assert native.product_topk(s.double(), 4, pi, pj) is None
    assert native.product_topk(torch.randn(5, 2, 2, 16)[..., ::2], 4, pi, pj) is not None  # strided: copied
    empty = native.product_topk(torch.randn(0, 2, 2, 16), 4, pi, pj)
    assert empty[0].shape == (0, 2, 4)
    cfg = MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=8, query_norm="none")
    mem = ProductKeyMemory(8, 8, cfg).eval()
    x = torch.randn(6, 8)
    x[2, 0] = float("nan")
    (gs, gi), (rs, ri) = selections(mem, x, monkeypatch)
    assert torch.equal(gi, ri) and torch.equal(gs.isnan(), rs.isnan())
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.product_topk(torch.randn(5, 2, 2, 16), 4, pi, pj) is None
    assert native.kernel_status() == "off (FORGETLESS_NATIVE=0)"
    monkeypatch.setenv(native.NATIVE_ENV, "maybe")
    with pytest.raises(ConfigError, match="FORGETLESS_NATIVE must be 1 or 0"):
        native.native_enabled()


@pytest.mark.parametrize("heads,norm", [(1, "layernorm"), (4, "whiten")])
def test_layer_outputs_and_gradients_match_with_padding(monkeypatch, heads, norm):
    """The whole layer, trained: same output and gradients (queries, sub-keys, query projection,
    values, gates) with the kernel as with the reference, padded batches included."""
    torch.manual_seed(heads)
    cfg = MemoryConfig(n_keys=32, heads=heads, knn=8, k_dim=16, query_norm=norm)
    mem = ProductKeyMemory(24, 24, cfg).train()
    mem(torch.randn(2, 40, 24))  # whitener statistics from an earlier batch
    mem.update_query_stats = False
    x = torch.randn(3, 11, 24)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[0, 7:] = False  # right padding
    mask[2, 3:] = False

    def run():
        xx = x.clone().requires_grad_(True)
        mem.token_mask = mask
        out = mem(xx)
        mem.token_mask = None
        (out * mask[..., None]).square().sum().backward()
        grads = [xx.grad] + [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for p in mem.parameters()]
        mem.zero_grad(set_to_none=True)
        return out.detach(), grads

    got = run()
    with monkeypatch.context() as m:
        m.setenv(native.NATIVE_ENV, "0")
        ref = run()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert len(got[1]) == len(ref[1]) == 1 + len(list(mem.parameters()))
    for g, r in zip(got[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_the_kernel_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path))
    path = native._build()
    assert path.parent == tmp_path / "native" and path.name.startswith("memory_kernels-") and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert native._build() == path and path.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    monkeypatch.setenv(native.ARCH_ENV, "x86-64-v2")  # another target: another library beside it
    other = native._build()
    assert other != path and sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, other.name])
    monkeypatch.setenv(native.ARCH_ENV, "native; rm -rf /")
    with pytest.raises(OSError, match="is not a -march target name"):
        native._build()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(OSError, match="no C\\+\\+ compiler"):
        native._build()


def test_bag_weight_gradient_equals_embedding_bag_backward():
    """gw[m, r] = <dL/dy[m], V[idx[m, r]]>: the kernel against F.embedding_bag's per-sample-weights
    backward, widths with and without a remainder of 32."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    for dim in (256, 40, 7):
        values = torch.randn(500, dim)
        idx = torch.randint(0, 500, (300, 24))
        w = torch.rand(300, 24, requires_grad=True)
        grad = torch.randn(300, dim)
        F.embedding_bag(idx, values, per_sample_weights=w, mode="sum").backward(grad)
        got = native.bag_weight_grad(values, idx, grad)
        assert got.shape == (300, 24) and got.dtype == torch.float32
        torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-5)
    assert native.bag_weight_grad(values.double(), idx, grad) is None  # not float32: the caller's path
    with pytest.raises(IndexError, match="bag index out of range"):
        native.bag_weight_grad(values, idx + 500, grad)


def test_without_a_compiler_the_layer_warns_once_and_runs_the_reference(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_status", "not built yet")
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "_compiler", lambda: None)
    cfg = MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=8, query_norm="none")
    mem = ProductKeyMemory(8, 8, cfg).eval()
    x = torch.randn(5, 8)
    with caplog.at_level("WARNING", logger="forgetless.models.native"):
        scores, slots = mem.lookup(x)
        mem.lookup(x)
    assert [r.getMessage() for r in caplog.records] == [
        "the compiled memory kernels are unavailable, using the PyTorch path: no C++ compiler found (set CXX, "
        "or install g++)"]
    assert native.kernel_status().startswith("unavailable (no C++ compiler")
    assert not native.native_available(x)
    with monkeypatch.context() as m:
        m.setenv(native.NATIVE_ENV, "0")
        ref = mem.lookup(x)
    assert torch.equal(scores, ref[0]) and torch.equal(slots, ref[1])
