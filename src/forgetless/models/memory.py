"""Product-key memory layer (Lample et al. 2019; Berges et al. 2024, "Memory Layers at Scale").

One lookup, per head h and token x:

    q      = norm(W_q x)                       query, split into halves q1, q2
    s1, s2 = K1_h q1, K2_h q2                  scores against sqrt(N) sub-keys per half
    I1, I2 = topk(s1, k), topk(s2, k)          k best sub-keys per half (one topk call for both)
    cand   = s1[I1][i] + s2[I2][j]             candidate pairs with (i+1)(j+1) <= k only (about
                                               k ln k of the k*k: the others cannot reach the top k),
                                               summed by one matmul with a 0/1 matrix (exact)
    I, s   = topk(cand, k)                     final k slots, index = i1 * sqrt(N) + i2 (exact: see tests)
    w      = softmax(s)
    y      = sum_h sum_j w_hj V[I_hj]          one weighted bag over all heads' slots
    out    = (y * silu(W1 x)) W2               "Memory+" gated output

On CPU the selection (the three top-k steps and the candidate sums) and the weights' gradient
of the bag run in a compiled kernel (``models.native``: same scores bit for bit, same slots but
for ties at the k-th place, which go to the lower index; gradients to float tolerance); the
PyTorch code (``_select_reference``, ``F.embedding_bag``'s backward) is the reference and runs on
GPUs, on NaN scores, with ``FORGETLESS_NATIVE=0`` and where no C++ compiler is found.

The value table V (N x v_dim) is read with ``F.embedding_bag`` (per-sample weights); with
``sparse_values`` its gradient is a coalesced sparse tensor over the rows actually read,
computed in O(reads) (``value_rows_grad``), and an optimizer such as
``torch.optim.SparseAdam`` (or the row-masked SGD of sparse memory finetuning)
updates O(rows touched), never the whole table.

Query normalisation is causal-safe: ``"layernorm"`` normalises each token on its own,
``"whiten"`` uses running statistics gathered from *earlier* batches only (updated
after the forward, over non-padding tokens), so no token sees statistics of padding
or of tokens that come after it.

Every lookup can be logged (``AccessLog``): per-slot read counts and per-document
read frequencies, with padding masked. This is what TF-IDF slot selection needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .native import bag_weight_grad, native_available, product_topk

QUERY_NORMS = ("none", "layernorm", "whiten")


@dataclass
class MemoryConfig:
    """Shape and training behaviour of one product-key memory layer."""

    n_keys: int = 256  # sub-keys per half; the memory has N = n_keys**2 slots
    heads: int = 4
    knn: int = 32  # k: slots read per head and token
    k_dim: int = 128  # query/key width per head (two halves of k_dim/2)
    v_dim: int | None = None  # value width; None = the model's hidden size
    query_norm: str = "whiten"  # one of QUERY_NORMS
    query_trainable: bool = True  # False freezes W_q at a random orthogonal init
    whiten_momentum: float = 0.01
    whiten_eps: float = 1e-3  # relative to the mean query variance
    key_norm: bool = False  # unit-norm sub-keys (cosine scores): no slot wins by key length
    learn_temperature: bool = False  # a learned per-head scale of the scores before the softmax
    gated: bool = True  # Memory+ output (y * silu(W1 x)) W2
    sparse_values: bool = True  # sparse gradient on the value table
    value_init_std: float | None = None  # None = v_dim ** -0.5

    def __post_init__(self) -> None:
        if self.query_norm not in QUERY_NORMS:
            raise ConfigError(f"memory.query_norm must be one of {QUERY_NORMS}, got {self.query_norm!r}.")
        if self.k_dim % 2:
            raise ConfigError(f"memory.k_dim must be even (two halves), got {self.k_dim}.")
        if not 1 <= self.knn <= self.n_keys:
            raise ConfigError(f"memory.knn must be between 1 and n_keys={self.n_keys}, got {self.knn}.")
        if self.heads < 1 or self.n_keys < 2:
            raise ConfigError("memory.heads must be >= 1 and memory.n_keys >= 2.")

    @property
    def n_slots(self) -> int:
        return self.n_keys**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ConfigError(f"unknown memory option(s) {bad}; expected some of {sorted(known)}.")
        return cls(**d)


class AccessLog:
    """Per-slot read statistics of one memory layer, padding masked.

    ``counts[i]``    number of reads of slot i (tokens x heads x k, not score-weighted)
    ``doc_freq[i]``  number of documents (sequences of the batch) in which slot i was read
    ``n_docs``       number of documents seen; ``n_batches`` number of forward passes
    ``last_indices`` / ``last_weights`` the most recent lookup (flattened reads of valid tokens),
    kept only when ``keep_last`` is set (sparse memory finetuning reads them).
    """

    def __init__(self, n_slots: int, per_doc: bool = False, keep_last: bool = False):
        self.n_slots = n_slots
        self.per_doc = per_doc
        self.keep_last = keep_last
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.n_slots, dtype=torch.long)
        self.doc_freq = torch.zeros(self.n_slots, dtype=torch.long)
        self.n_docs = 0
        self.n_batches = 0
        self.last_indices: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_full: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def record(self, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None) -> None:
        """indices, weights: (B, T, H, k); mask: (B, T) bool of real tokens or None."""
        b = indices.shape[0]
        flat = indices.reshape(b, -1)
        if mask is not None:
            valid = mask[:, :, None, None].expand_as(indices).reshape(b, -1)
        else:
            valid = torch.ones_like(flat, dtype=torch.bool)
        sel = flat[valid]
        self.counts += torch.bincount(sel, minlength=self.n_slots).cpu()
        if self.per_doc:
            seen = torch.zeros(b, self.n_slots, dtype=torch.bool, device=indices.device)
            seen.scatter_(1, torch.where(valid, flat, 0), valid)
            has_tokens = valid.any(dim=1)
            self.doc_freq += seen[has_tokens].sum(0).cpu()
            self.n_docs += int(has_tokens.sum())
        self.n_batches += 1
        if self.keep_last:
            self.last_indices = sel
            self.last_weights = weights.reshape(b, -1)[valid].detach()
            self.last_full = (indices.detach(), weights.detach())  # (B, T, H, k) each


def candidate_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (i, j) ranks of the sub-key pairs that can reach the top k of the products.

    With both halves' top-k scores sorted (v1[0] >= v1[1] >= ..., same for v2), every pair
    (i', j') with i' <= i and j' <= j scores v1[i'] + v2[j'] >= v1[i] + v2[j] (rounding is
    monotone), so a pair with (i + 1) * (j + 1) > k has at least k others at or above it
    and is never needed: about k ln k candidates (119 for k = 32) instead of k * k."""
    pairs = [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
    pi, pj = zip(*pairs)
    return torch.tensor(pi), torch.tensor(pj)


def exact_fp32_matmul(device: torch.device) -> bool:
    """Whether an fp32 matmul on this device computes in fp32 (no bf16/tf32 shortcut set by
    ``torch.set_float32_matmul_precision`` or the backends' ``fp32_precision``)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    backend = torch.backends.mkldnn if device.type == "cpu" else getattr(torch.backends, device.type, None)
    matmul = getattr(backend, "matmul", None)
    if device.type == "cuda" and getattr(matmul, "allow_tf32", False):
        return False
    return getattr(matmul, "fp32_precision", "none") in ("none", "ieee")


class _ProductScores(torch.autograd.Function):
    """The gradient of the compiled selection (``models.native.product_topk``): each chosen
    score is s[half 0, row] + s[half 1, col] of its slot (slot = row * n_keys + col), so the
    gradient of the sub-key scores adds each score's gradient at those two places (what the
    PyTorch path's topk, gather and sum backwards add up to)."""

    @staticmethod
    def forward(ctx, s, scores, slots, n_keys):
        ctx.save_for_backward(slots)
        ctx.shape, ctx.n_keys = s.shape, n_keys
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        rows = torch.div(slots, ctx.n_keys, rounding_mode="floor")
        gs = grad.new_zeros(ctx.shape)
        gs[:, :, 0].scatter_add_(-1, rows, grad)
        gs[:, :, 1].scatter_add_(-1, slots - rows * ctx.n_keys, grad)
        return gs, None, None, None


class _SparseValueGrad(torch.autograd.Function):
    """Identity on the bag ``y = sum_r w[m, r] V[idx[m, r]]`` (computed by ``F.embedding_bag``
    on the detached table, which also gives the weights their gradient with its fused kernel,
    or, when ``w`` is passed with its graph, by ``models.native.bag_weight_grad`` here);
    in the backward it adds the gradient of the value table V as a *coalesced* sparse tensor:
    one row per distinct row read, computed by sorting the reads by row and summing each row's
    weighted output gradients with one ``F.embedding_bag`` over the output gradient. The cost
    is O(reads), never O(N), and the optimizer has nothing left to coalesce.

    ``mem.value_grad_rows`` (a 1-D tensor of row ids, or a function returning one, read at
    backward time) restricts the gradient to those rows: sparse memory finetuning chooses its
    rows there, so the rows it would mask away are never computed."""

    @staticmethod
    def forward(ctx, y, idx, w, values, mem):
        ctx.save_for_backward(idx, w, values if ctx.needs_input_grad[2] else None)  # the table: for gw only
        ctx.shape, ctx.dtype, ctx.mem = values.shape, values.dtype, mem
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        idx, w, values = ctx.saved_tensors
        mem = ctx.mem
        rows = getattr(mem, "value_grad_rows", None)
        gv = value_rows_grad(idx, w, grad, ctx.shape, ctx.dtype, rows() if callable(rows) else rows)
        if mem is not None:
            mem._fresh_value_grad = gv._indices().data_ptr()
        gw = None
        if ctx.needs_input_grad[2]:  # the weights' gradient, when weighted_bag left it to us
            gw = bag_weight_grad(values, idx, grad)
            if gw is None:  # the kernel went away between forward and backward: the same dots in PyTorch
                gw = torch.einsum("mrd,md->mr", values.detach()[idx], grad.to(values.dtype))
            gw = gw.to(w.dtype)
        return grad, None, gw, gv, None


def _keep_coalesced(param: torch.Tensor, mem: "ProductKeyMemory") -> None:
    """Post-accumulate hook of the value table: autograd stores a fresh sparse gradient without
    its "coalesced" mark, so the optimizer would sort it again. When ``.grad`` is exactly the
    tensor our backward produced (same index storage: not summed with an earlier gradient),
    its rows are unique and sorted, and the mark is restored."""
    g, fresh = param.grad, mem._fresh_value_grad
    mem._fresh_value_grad = None
    if g is not None and g.is_sparse and fresh is not None and not g.is_coalesced() and g._indices().data_ptr() == fresh:
        g._coalesced_(True)


def value_rows_grad(idx: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, shape, dtype,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse (coalesced) gradient of V for y[m] = sum_r w[m, r] V[idx[m, r]] given dL/dy.

    ``rows``: only these rows of V get a gradient (None: every row read)."""
    m, r = idx.shape
    flat = idx.reshape(-1)
    pos = None
    if rows is not None:
        keep = torch.zeros(shape[0], dtype=torch.bool, device=idx.device)
        keep[rows.to(idx.device)] = True
        pos = keep[flat].nonzero().flatten()
        flat = flat[pos]
    key = flat.int() if shape[0] < 2**31 else flat
    sorted_rows, order = key.sort(stable=True)
    if pos is not None:
        order = pos[order]
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    row_grad = F.embedding_bag(torch.div(order, r, rounding_mode="floor"), grad.to(dtype).contiguous(), offsets,
                               mode="sum", per_sample_weights=w.reshape(-1)[order].to(dtype))
    return torch.sparse_coo_tensor(uniq.long()[None], row_grad, shape, is_coalesced=True, check_invariants=False)


def weighted_bag(idx: torch.Tensor, w: torch.Tensor, values: torch.Tensor, sparse: bool = True,
                 mem: nn.Module | None = None) -> torch.Tensor:
    """y[m] = sum_r w[m, r] * values[idx[m, r]]; idx, w: (M, R). With ``sparse`` (and a value
    table that needs a gradient) the table's gradient is a coalesced sparse tensor over the rows
    read (restricted to ``mem.value_grad_rows`` when set); otherwise the plain dense gradient."""
    w = w.to(values.dtype)
    if not (sparse and values.requires_grad and torch.is_grad_enabled()):
        return F.embedding_bag(idx, values, per_sample_weights=w, mode="sum")
    if w.requires_grad and native_available(values):
        # the compiled kernel computes the weights' gradient in the backward (models.native)
        with torch.no_grad():
            y = F.embedding_bag(idx, values.detach(), per_sample_weights=w.detach(), mode="sum")
        return _SparseValueGrad.apply(y, idx, w, values, mem)
    y = F.embedding_bag(idx, values.detach(), per_sample_weights=w, mode="sum")
    return _SparseValueGrad.apply(y, idx, w.detach(), values, mem)


def _orthogonal_(w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill a (out, in) matrix with a random (semi-)orthogonal one, scaled like a default Linear."""
    a = torch.randn(max(w.shape), min(w.shape), generator=generator)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    q = q if w.shape[0] >= w.shape[1] else q.T
    with torch.no_grad():
        w.copy_(q[: w.shape[0], : w.shape[1]] * math.sqrt(w.shape[0] / max(w.shape[1], 1)))
    return w


class ProductKeyMemory(nn.Module):
    """A product-key memory that maps (..., in_dim) -> (..., out_dim).

    Submodule names avoid the Llama MLP names (gate_proj, up_proj, down_proj) so that
    PEFT's "all-linear" targeting and HF weight loading never confuse the two.
    """

    def __init__(self, in_dim: int, out_dim: int, config: MemoryConfig | None = None):
        super().__init__()
        self.config = cfg = config or MemoryConfig()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.v_dim = v_dim = cfg.v_dim or out_dim
        half = cfg.k_dim // 2

        self.mem_query = nn.Linear(in_dim, cfg.heads * cfg.k_dim, bias=False)
        self.sub_keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, half))
        self.values = nn.Parameter(torch.empty(cfg.n_slots, v_dim))
        if cfg.learn_temperature:
            self.log_temperature = nn.Parameter(torch.zeros(cfg.heads))
        if cfg.gated:
            self.mem_gate = nn.Linear(in_dim, v_dim, bias=False)
            self.mem_out = nn.Linear(v_dim, out_dim, bias=False)
        elif v_dim != out_dim:
            raise ConfigError("memory.v_dim must equal the output size when memory.gated is false.")
        if cfg.query_norm == "whiten":
            eye = torch.eye(half).expand(cfg.heads, 2, half, half).clone()
            self.register_buffer("q_mean", torch.zeros(cfg.heads, 2, half))
            self.register_buffer("q_cov", eye.clone())
            self.register_buffer("q_whitener", eye)
            self.register_buffer("q_stats_ready", torch.zeros((), dtype=torch.bool))
        self.access_log: AccessLog | None = None
        self.token_mask: torch.Tensor | None = None  # (B, T) bool, set by the host model's hook
        self.update_query_stats = True  # fine-tuning turns this off: lookups then stay as pretrained
        # rows whose value gradient the backward computes: None = all rows read, a tensor, or a
        # function returning one (called once per backward)
        self.value_grad_rows: torch.Tensor | Callable[[], torch.Tensor] | None = None
        self._fresh_value_grad: int | None = None
        self.values.register_post_accumulate_grad_hook(lambda p, mem=self: _keep_coalesced(p, mem))
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        cfg = self.config
        bound = 1.0 / math.sqrt(cfg.k_dim)
        nn.init.uniform_(self.sub_keys, -bound, bound)
        nn.init.normal_(self.values, std=cfg.value_init_std or self.v_dim**-0.5)
        if cfg.query_trainable:
            nn.init.kaiming_uniform_(self.mem_query.weight, a=math.sqrt(5))
        else:
            _orthogonal_(self.mem_query.weight)
            self.mem_query.weight.requires_grad_(False)
        if cfg.gated:
            for lin in (self.mem_gate, self.mem_out):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))

    @property
    def n_slots(self) -> int:
        return self.config.n_slots

    # ---------------------------------------------------------------- lookup
    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """(BT, in) -> normalised queries (BT, H, 2, half)."""
        cfg = self.config
        q = F.linear(x, self.mem_query.weight.float()).view(x.shape[0], cfg.heads, 2, cfg.k_dim // 2)
        if cfg.query_norm == "layernorm":
            q = F.layer_norm(q, q.shape[-1:])
        elif cfg.query_norm == "whiten":
            raw = q
            # clones: the in-place statistics update below must not touch saved tensors
            q = torch.einsum("nhsd,hsed->nhse", q - self.q_mean.clone(), self.q_whitener.clone())
            if self.training and self.update_query_stats:
                self._update_whitener(raw.detach())
        return q

    @torch.no_grad()
    def _update_whitener(self, raw: torch.Tensor) -> None:
        """EMA of mean/covariance of the raw queries of valid tokens; used from the next batch on."""
        if self.token_mask is not None:
            raw = raw[self.token_mask.reshape(-1)]
        if raw.shape[0] < 2:
            return
        mean = raw.mean(0)
        centred = raw - mean
        cov = torch.einsum("nhsd,nhse->hsde", centred, centred) / (raw.shape[0] - 1)
        m = 1.0 if not bool(self.q_stats_ready) else self.config.whiten_momentum
        self.q_mean.lerp_(mean, m)
        self.q_cov.lerp_(cov, m)
        self.q_stats_ready.fill_(True)
        evals, evecs = torch.linalg.eigh(self.q_cov)
        eps = self.config.whiten_eps * evals.mean(-1, keepdim=True).clamp_min(1e-12)
        inv_sqrt = (evals.clamp_min(0) + eps).rsqrt()
        self.q_whitener.copy_((evecs * inv_sqrt[..., None, :]) @ evecs.transpose(-1, -2))

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k slots of every head. x: (BT, in) -> (scores, indices), each (BT, H, k).

        Scoring runs in fp32 even under autocast, so that top-k choices are exact."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._lookup_fp32(x.float())

    def _lookup_fp32(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        q = self._queries(x)
        keys = self.sub_keys.float()
        if cfg.key_norm:
            keys = F.normalize(keys, dim=-1)
        s = torch.einsum("nhsd,hskd->nhsk", q, keys)  # both halves: (BT, H, 2, n_keys)
        pi, pj, _ = self._pairs(x.device)
        with torch.no_grad():
            native = product_topk(s.detach(), cfg.knn, pi, pj)  # the compiled selection, where it runs
        if native is None:
            return self._select_reference(s)
        scores, slots = native
        if s.requires_grad:
            scores = _ProductScores.apply(s, scores, slots, cfg.n_keys)
        return scores, slots

    def _select_reference(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection in PyTorch: (scores, slots) of the sub-key scores s (BT, H, 2, n_keys).
        The reference of the compiled kernel (``models.native``), and the path on GPUs."""
        cfg = self.config
        v, i = s.topk(cfg.knn, dim=-1)  # sorted: candidate_pairs relies on it
        pi, pj, pick = self._pairs(s.device)
        if exact_fp32_matmul(s.device):
            # v1[pi] + v2[pj] as one matmul with a 0/1 matrix: each output adds exactly two
            # scores (and zeros), so it is the same sum bit for bit, at a fraction of the cost
            # of two index_selects (and a matmul backward instead of two index_adds)
            cand = (v.reshape(-1, 2 * cfg.knn) @ pick).view(*v.shape[:2], -1)
        else:  # the matmul may round through bf16/tf32 here: sums in plain fp32
            cand = v[:, :, 0].index_select(-1, pi) + v[:, :, 1].index_select(-1, pj)
        scores, best = cand.topk(cfg.knn, dim=-1)  # (BT, H, k) over ~k ln k candidates
        rows = i[:, :, 0].gather(-1, pi[best])
        cols = i[:, :, 1].gather(-1, pj[best])
        return scores, rows * cfg.n_keys + cols

    def _pairs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """candidate_pairs(k) and its 0/1 matrix (2k, P): [v1, v2] @ pick = v1[pi] + v2[pj]."""
        cached = getattr(self, "_pair_cache", None)
        if cached is None or cached[0].device != device:
            k = self.config.knn
            pi, pj = candidate_pairs(k)
            pick = torch.zeros(2 * k, pi.numel())
            cols = torch.arange(pi.numel())
            pick[pi, cols] = 1.0
            pick[k + pj, cols] = 1.0
            cached = self._pair_cache = (pi.to(device), pj.to(device), pick.to(device))
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        scores, indices = self.lookup(flat)
        if self.config.learn_temperature:
            scores = scores * self.log_temperature.exp()[:, None]
        weights = scores.softmax(dim=-1)  # per head
        if self.access_log is not None:
            shape = (lead[0], -1, cfg.heads, cfg.knn) if len(lead) == 2 else (1, -1, cfg.heads, cfg.knn)
            mask = self.token_mask if (self.token_mask is not None and len(lead) == 2) else None
            self.access_log.record(indices.view(shape), weights.view(shape), mask)
        idx2, w2 = indices.reshape(flat.shape[0], -1), weights.reshape(flat.shape[0], -1)
        bag = weighted_bag(idx2, w2, self.values, sparse=cfg.sparse_values, mem=self)
        if cfg.gated:
            out = self.mem_out(bag.to(flat.dtype) * F.silu(self.mem_gate(flat)))
        else:
            out = bag.to(flat.dtype)
        return out.view(*lead, self.out_dim)


class ParallelMemory(nn.Module):
    """Keeps the original MLP and adds a memory beside it: out = mlp(x) + memory(x)."""

    def __init__(self, mlp: nn.Module, memory: ProductKeyMemory):
        super().__init__()
        self.mlp = mlp
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.memory(x)


@dataclass
class MemoryPlacement:
    """Where memory layers sit in a decoder: stored in the model's config.json."""

    layers: list[int] = field(default_factory=lambda: [2])
    mode: str = "replace"  # "replace" the MLP, or "parallel" (MLP + memory)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "mode": self.mode, "memory": self.memory.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryPlacement":
        mem = d.get("memory", {})
        return cls(layers=list(d["layers"]), mode=d.get("mode", "replace"),
                   memory=mem if isinstance(mem, MemoryConfig) else MemoryConfig.from_dict(mem))


CONFIG_KEY = "forgetless_memory"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of an HF causal LM (Llama family: model.model.layers)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}; expected model.model.layers.")


def memory_layers(model: nn.Module) -> list[ProductKeyMemory]:
    """All product-key memories of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, ProductKeyMemory)]


def named_memory_layers(model: nn.Module) -> dict[str, ProductKeyMemory]:
    """Module name -> product-key memory, in layer order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ProductKeyMemory)}


def freeze_query_stats(model: nn.Module) -> None:
    """Stop the running query statistics from moving (fine-tuning keeps lookups as pretrained)."""
    for m in memory_layers(model):
        m.update_query_stats = False


def _capture_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    t = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
    tok = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and t is not None:
        tok = mask[:, -t:].bool()
    for mem in memory_layers(module):
        mem.token_mask = tok


def _release_mask(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    for mem in memory_layers(module):
        mem.token_mask = None


def add_memory_layers(
    model: nn.Module,
    layers: list[int] | None = None,
    mode: str = "replace",
    config: MemoryConfig | None = None,
    placement: MemoryPlacement | None = None,
) -> nn.Module:
    """Swap a product-key memory into (mode="replace") or beside (mode="parallel") the MLP
    of the given decoder layers of any HF decoder model, in place ("parallel" starts with zero
    values: the model's output is bit-identical until the memory is trained). The placement is
    recorded in ``model.config`` so that ``save_model``/``load_model`` can rebuild it."""
    placement = placement or MemoryPlacement(layers=list(layers or [2]), mode=mode, memory=config or MemoryConfig())
    if placement.mode not in ("replace", "parallel"):
        raise ConfigError(f"memory mode must be 'replace' or 'parallel', got {placement.mode!r}.")
    blocks = decoder_layers(model)
    hidden = model.config.hidden_size
    for i in placement.layers:
        if not -len(blocks) <= i < len(blocks):
            raise ConfigError(f"memory layer {i} does not exist: the model has {len(blocks)} decoder layers.")
        mem = ProductKeyMemory(hidden, hidden, placement.memory)
        old = blocks[i].mlp
        ref = next(old.parameters())
        mem.to(device=ref.device, dtype=ref.dtype)
        if placement.mode == "parallel":  # beside a pretrained MLP: zero values, so the memory adds exactly 0 at first
            with torch.no_grad():
                mem.values.zero_()
        blocks[i].mlp = mem if placement.mode == "replace" else ParallelMemory(old, mem)
    setattr(model.config, CONFIG_KEY, placement.to_dict())
    if not getattr(model, "_forgetless_mask_hook", False):
        model.register_forward_pre_hook(_capture_mask, with_kwargs=True)
        model.register_forward_hook(_release_mask, with_kwargs=True)
        model._forgetless_mask_hook = True
    return model


def memory_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split trainable parameters into memory values, memory keys+query, and the rest."""
    groups: dict[str, list[nn.Parameter]] = {"values": [], "keys": [], "other": []}
    mem_params = {}
    for mem in memory_layers(model):
        mem_params[id(mem.values)] = "values"
        mem_params[id(mem.sub_keys)] = "keys"
        mem_params[id(mem.mem_query.weight)] = "keys"
        if mem.config.learn_temperature:
            mem_params[id(mem.log_temperature)] = "keys"
    for p in model.parameters():
        if p.requires_grad:
            groups[mem_params.get(id(p), "other")].append(p)
    return groups
