"""The product-key memory layer: exactness, gradients, sparse updates, access logging, save/load."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from forgetless.errors import CheckpointError, ConfigError
from forgetless.models.checkpoint import load_model, save_model
from forgetless.models.memory import (
    AccessLog,
    MemoryConfig,
    ProductKeyMemory,
    add_memory_layers,
    candidate_pairs,
    memory_layers,
    memory_parameter_groups,
    value_rows_grad,
    weighted_bag,
)


def exhaustive_scores(mem: ProductKeyMemory, x: torch.Tensor, float64: bool = False):
    """Scores of all N = n*n full keys, slot i1*n + i2 = concatenation of sub-keys i1 and i2.

    In float32 the score of a full key is computed as q1.k1 + q2.k2 (the same rounding as the
    layer, so top-k must agree exactly); in float64 as one dot product with the concatenated key."""
    cfg = mem.config
    q = mem._queries(x.float())  # (BT, H, 2, half)
    keys = mem.sub_keys.float()
    if cfg.key_norm:
        keys = F.normalize(keys, dim=-1)
    n = cfg.n_keys
    if float64:
        full = torch.cat([keys[:, 0].repeat_interleave(n, dim=1), keys[:, 1].repeat(1, n, 1)], dim=-1)
        return torch.einsum("bhd,hnd->bhn", q.flatten(-2).double(), full.double())
    s1 = torch.einsum("bhd,hkd->bhk", q[:, :, 0], keys[:, 0])
    s2 = torch.einsum("bhd,hkd->bhk", q[:, :, 1], keys[:, 1])
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2)


@pytest.mark.parametrize("heads,knn,n_keys,norm,key_norm", [
    (1, 4, 16, "none", False), (2, 8, 32, "layernorm", False), (4, 32, 64, "whiten", False),
    (3, 16, 32, "whiten", True), (4, 32, 256, "layernorm", True)])
def test_product_keys_equal_exhaustive_scoring(heads, knn, n_keys, norm, key_norm):
    torch.manual_seed(heads * 100 + knn)
    cfg = MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=16, query_norm=norm, key_norm=key_norm)
    mem = ProductKeyMemory(24, 24, cfg)
    mem.train()
    mem(torch.randn(2, 50, 24))  # gives the whitener statistics
    mem.eval()
    x = torch.randn(300, 24)
    scores, idx = mem.lookup(x)
    ex_scores, ex_idx = exhaustive_scores(mem, x).topk(cfg.knn, dim=-1)
    assert torch.equal(idx, ex_idx)
    assert torch.equal(scores, ex_scores)
    exact = exhaustive_scores(mem, x, float64=True)
    torch.testing.assert_close(scores.double(), exact.topk(cfg.knn, dim=-1).values, rtol=1e-5, atol=1e-5)
    assert idx.min() >= 0 and idx.max() < n_keys**2


def test_gradients_reach_keys_query_values_and_gates():
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 32, MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=16, learn_temperature=True,
                                                   query_norm="layernorm"))
    x = torch.randn(3, 7, 32)
    _, idx = mem.lookup(x.reshape(-1, 32))
    mem(x).square().sum().backward()
    for name in ("sub_keys", "mem_query.weight", "mem_gate.weight", "mem_out.weight", "log_temperature"):
        g = dict(mem.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    g = mem.values.grad
    assert g.is_sparse
    # the sparse gradient holds exactly the rows that were read, each once
    rows = g._indices()[0]
    assert rows.unique().numel() == rows.numel()
    assert set(rows.tolist()) == set(idx.flatten().tolist())


def test_weighted_bag_matches_dense_autograd():
    torch.manual_seed(1)
    v = torch.randn(50, 8, requires_grad=True)
    idx = torch.randint(0, 50, (20, 6))
    idx[0, :3] = 7  # the same row read several times by one token
    w = torch.rand(20, 6, requires_grad=True)
    g = torch.randn(20, 8)
    weighted_bag(idx, w, v, sparse=True).backward(g)
    assert v.grad.is_sparse
    rows = v.grad._indices()[0]
    assert torch.equal(rows, idx.unique())  # each row read exactly once, sorted
    gv, gw = v.grad.to_dense().clone(), w.grad.clone()
    v.grad, w.grad = None, None
    (v[idx] * w[..., None]).sum(1).backward(g)
    torch.testing.assert_close(gv, v.grad)
    torch.testing.assert_close(gw, w.grad)


def test_value_gradient_restricted_to_given_rows_equals_masked_dense():
    torch.manual_seed(4)
    v = torch.randn(64, 5, requires_grad=True)
    idx = torch.randint(0, 64, (30, 12))
    w, g = torch.rand(30, 12), torch.randn(30, 5)
    (v[idx] * w[..., None]).sum(1).backward(g)
    dense = v.grad.clone()
    rows = torch.tensor([0, 3, 5, 9, 17, 40, 63])
    got = value_rows_grad(idx, w, g, v.shape, v.dtype, rows)
    assert got.is_coalesced()
    assert torch.equal(got._indices()[0], rows[torch.isin(rows, idx)])  # selected rows that were read, exactly
    masked = torch.zeros_like(dense)
    masked[rows] = dense[rows]
    torch.testing.assert_close(got.to_dense(), masked)


def test_candidate_pairs_keep_every_possible_top_k_pair():
    k = 32
    pi, pj = candidate_pairs(k)
    assert pi.numel() == sum(k // (i + 1) for i in range(k)) == 119
    torch.manual_seed(5)
    v1 = torch.randn(500, k).sort(-1, descending=True).values
    v2 = torch.randn(500, k).sort(-1, descending=True).values
    full = (v1[:, :, None] + v2[:, None, :]).flatten(1).topk(k, dim=-1)
    part_v, part_i = (v1[:, pi] + v2[:, pj]).topk(k, dim=-1)
    assert torch.equal(part_v, full.values)
    assert torch.equal(pi[part_i] * k + pj[part_i], full.indices)


@pytest.mark.parametrize("heads,knn", [(1, 4), (3, 16), (4, 32)])
def test_candidate_matmul_equals_index_select_sums(monkeypatch, heads, knn):
    """The 0/1-matmul candidate sums give the same slots and scores bit for bit as two
    index_selects, and the same gradients to float tolerance; without exact fp32 matmuls
    (``set_float32_matmul_precision("medium")``) the layer takes the index_select path."""
    import forgetless.models.memory as memory

    monkeypatch.setenv("FORGETLESS_NATIVE", "0")  # the PyTorch selection (tests/test_native.py: the kernel)
    torch.manual_seed(heads + knn)
    cfg = MemoryConfig(n_keys=64, heads=heads, knn=knn, k_dim=32, query_norm="layernorm")
    mem = ProductKeyMemory(24, 24, cfg).train()
    x = torch.randn(2, 70, 24)

    def run():
        xx = x.clone().requires_grad_(True)
        scores, idx = mem.lookup(xx.reshape(-1, 24))
        (scores * torch.linspace(-1, 1, scores.numel()).view_as(scores)).sum().backward()
        grads = (xx.grad, mem.sub_keys.grad.clone(), mem.mem_query.weight.grad.clone())
        mem.zero_grad(set_to_none=True)
        return scores.detach(), idx, grads

    assert memory.exact_fp32_matmul(torch.device("cpu"))
    got = run()
    with monkeypatch.context() as m:
        m.setattr(memory, "exact_fp32_matmul", lambda device: False)
        ref = run()
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r)
    try:
        torch.set_float32_matmul_precision("medium")
        assert not memory.exact_fp32_matmul(torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision("highest")
    assert memory.exact_fp32_matmul(torch.device("cpu"))


def reference_forward(mem: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """The layer computed densely: exhaustive scores of all N slots, top-k, softmax, dense gather."""
    cfg = mem.config
    flat = x.reshape(-1, x.shape[-1])
    scores, idx = exhaustive_scores(mem, flat).topk(cfg.knn, dim=-1)
    w = scores.softmax(-1).reshape(flat.shape[0], -1)
    y = (mem.values[idx.reshape(flat.shape[0], -1)] * w[..., None]).sum(1)
    out = mem.mem_out(y * F.silu(mem.mem_gate(flat))) if cfg.gated else y
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("heads,norm,sparse", [(1, "layernorm", True), (4, "whiten", True), (3, "none", False)])
def test_layer_outputs_and_gradients_equal_dense_reference(heads, norm, sparse):
    torch.manual_seed(heads)
    cfg = MemoryConfig(n_keys=16, heads=heads, knn=8, k_dim=16, query_norm=norm, sparse_values=sparse)
    mem = ProductKeyMemory(24, 24, cfg)
    mem.train()
    mem(torch.randn(2, 40, 24))  # whitener statistics from an earlier batch
    x = torch.randn(3, 9, 24)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 6:] = False  # right padding
    mask[2, 2:] = False
    mem.eval()
    ref = reference_forward(mem, x)
    _, ref_idx = exhaustive_scores(mem, x.reshape(-1, 24)).topk(cfg.knn, dim=-1)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.to_dense().clone() for n, p in mem.named_parameters()}
    mem.zero_grad(set_to_none=True)
    mem.train()
    mem.token_mask = mask
    mem.access_log = AccessLog(cfg.n_slots, per_doc=True, keep_last=True)
    out = mem(x)  # train mode: the whitener moves only after this forward
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    for n, p in mem.named_parameters():
        assert p.grad.is_sparse == (sparse and n == "values"), n
        torch.testing.assert_close(p.grad.to_dense(), ref_grads[n], rtol=1e-4, atol=1e-5)
    read = ref_idx.reshape(3, 9, -1)[mask].unique()
    if sparse:
        assert torch.equal(mem.values.grad._indices()[0], ref_idx.unique())  # every row read, once
        assert mem.values.grad.is_coalesced()  # so the optimizer does not sort it again
    if sparse and norm != "whiten":  # (whitening moved after the first forward: another lookup)
        first = mem.values.grad.to_dense().clone()
        mem(x).square().sum().backward()  # a second backward accumulates into the same gradient
        torch.testing.assert_close(mem.values.grad.coalesce().to_dense(), 2 * first)
    assert torch.equal(mem.access_log.last_indices.unique(), read)  # padding not logged


def test_sparse_adam_touches_only_read_rows():
    torch.manual_seed(2)
    mem = ProductKeyMemory(16, 16, MemoryConfig(n_keys=32, heads=2, knn=4, k_dim=8)).eval()
    opt = torch.optim.SparseAdam([mem.values], lr=0.1)
    before = mem.values.detach().clone()
    x = torch.randn(1, 5, 16)
    _, idx = mem.lookup(x.reshape(-1, 16))
    mem(x).sum().backward()
    opt.step()
    changed = (mem.values.detach() != before).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) == set(idx.flatten().tolist())


def test_access_counts_equal_direct_count_with_padding_masked():
    torch.manual_seed(3)
    cfg = MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=8, query_norm="layernorm")
    mem = ProductKeyMemory(16, 16, cfg).eval()
    mem.access_log = AccessLog(mem.n_slots, per_doc=True)
    x = torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding of the first sequence
    mem.token_mask = mask
    mem(x)
    _, idx = mem.lookup(x.reshape(-1, 16))
    idx = idx.view(3, 6, 2, 4)
    direct = torch.bincount(idx[mask].flatten(), minlength=mem.n_slots)
    assert torch.equal(mem.access_log.counts, direct)
    doc = torch.zeros(mem.n_slots, dtype=torch.long)
    for b in range(3):
        doc[idx[b][mask[b]].flatten().unique()] += 1
    assert torch.equal(mem.access_log.doc_freq, doc)
    assert mem.access_log.n_docs == 3 and int(direct.sum()) == 16 * 2 * 4


def test_whitening_uses_only_earlier_batches_and_real_tokens():
    cfg = MemoryConfig(n_keys=8, heads=1, knn=2, k_dim=4)
    torch.manual_seed(4)
    fresh = ProductKeyMemory(8, 8, cfg).train()
    padded = ProductKeyMemory(8, 8, cfg).train()
    padded.load_state_dict(fresh.state_dict())
    x = torch.randn(1, 5, 8)
    # the same real tokens, once with three huge left-padding tokens that must not count
    fresh(x)
    padded.token_mask = torch.tensor([[False] * 3 + [True] * 5])
    padded(torch.cat([torch.randn(1, 3, 8) * 100, x], dim=1))
    torch.testing.assert_close(padded.q_mean, fresh.q_mean)
    torch.testing.assert_close(padded.q_cov, fresh.q_cov)
    # causal: in training mode a token's output does not depend on later tokens of its batch
    torch.manual_seed(5)
    m3 = ProductKeyMemory(8, 8, cfg).train()
    m3(torch.randn(2, 9, 8))
    state = {k: v.clone() for k, v in m3.state_dict().items()}
    y1 = m3(x[:, :3])
    m3.load_state_dict(state)
    y2 = m3(x)
    torch.testing.assert_close(y1, y2[:, :3])
    # frozen statistics (fine-tuning): a forward pass leaves them unchanged
    m3.update_query_stats = False
    before = m3.q_mean.clone()
    m3(torch.randn(2, 9, 8))
    assert torch.equal(before, m3.q_mean)


def _tiny_llama():
    return tiny_llama(vocab=64, hidden=32, layers=3, positions=64, tie_word_embeddings=True)


@pytest.mark.parametrize("mode", ["replace", "parallel"])
def test_memory_model_save_load_identical_logits(tmp_path, mode):
    model = add_memory_layers(_tiny_llama(), layers=[1], mode=mode,
                              config=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8, key_norm=True))
    model.train()
    ids = torch.randint(0, 64, (2, 12))
    model(input_ids=ids)  # updates whitening statistics (buffers must be saved too)
    model.eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert len(memory_layers(loaded)) == 1
    # generation with KV cache and left padding goes through the memory too
    out = loaded.generate(input_ids=ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long),
                          max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


def test_corrupt_or_mismatched_checkpoint_fails_clearly(tmp_path):
    model = add_memory_layers(_tiny_llama(), layers=[1], config=MemoryConfig(n_keys=8, heads=1, knn=2, k_dim=8))
    d = save_model(model, tmp_path / "m")
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x10  # one flipped bit in a weight: the file still parses, the checksum does not match
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match the checksum"):
        load_model(d)
    w.write_bytes(bytes(data[:1000]))
    (d / "checksums.json").unlink()  # without a recorded checksum, a truncated file is still caught
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    # weights that do not match the memory recorded in config.json
    d2 = save_model(_tiny_llama(), tmp_path / "dense")
    (d2 / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_model(d2)


def test_memory_parameter_groups_and_bad_config():
    model = add_memory_layers(_tiny_llama(), layers=[0, 2], config=MemoryConfig(n_keys=8, heads=1, knn=2, k_dim=8))
    g = memory_parameter_groups(model)
    assert len(g["values"]) == 2 and len(g["keys"]) == 4
    with pytest.raises(ConfigError, match="query_norm"):
        MemoryConfig(query_norm="batchnorm")
    with pytest.raises(ConfigError, match="does not exist"):
        add_memory_layers(_tiny_llama(), layers=[7])
