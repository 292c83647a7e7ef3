"""Titans neural long-term memory (Behrouz et al. 2024, "Titans: Learning to Memorize at Test
Time"), as a model option on any HF Llama-style decoder.

A ``NeuralMemory`` is a small MLP M (two layers, SiLU) whose *weights are written at inference*
by gradient steps on an associative loss. For the hidden states x of a sequence (RMS-normed):

    q = normalise(x W_q),  k = normalise(x W_k),  v = x W_v
    loss(M; chunk) = mean over the chunk's tokens of |M(k_t) - v_t|^2
    S_i = eta * S_{i-1} - theta * grad loss(M_{i-1}; chunk i)      (surprise: momentum + current gradient)
    M_i = (1 - alpha) * M_{i-1} + S_i                               (alpha: weight decay = forgetting)

The sequence is cut into chunks of ``chunk`` tokens; chunk i is *read* with the memory written
by chunks 1..i-1 (y = M_{i-1}(q) W_o), so no token reads a memory that has seen it; then chunk i
is written. The read y is added to the residual stream *before* the decoder layer it sits in
(memory as a layer, the paper's MAL variant): h <- h + y, then the layer's attention and MLP.
``W_o`` starts at zero, so adding a memory leaves the model's function unchanged until its
outer parameters (W_q, W_k, W_v, W_o, the norm and the initial memory M_0) are trained by the
ordinary training loop; that outer loop differentiates through the inner writes
(``create_graph`` while training), so the projections learn what is worth memorising.

``memory_update`` is the update rule on its own (tested on hand-made tensors). The memory's
state lives only within one forward call: a new call (a new batch, or each step of cached
generation) starts again from M_0. The placement is stored in ``model.config`` under
``forgetless_titans`` so that ``models.checkpoint.load_model`` rebuilds it.

Left out of Titans: data-dependent gates (eta, theta, alpha are constants here, not functions
of x_t), the persistent memory tokens, the MAC (memory as context) and MAG (gated sliding-window)
variants, the convolutions on q/k/v, deeper memories, and the parallel (associative scan)
training of the inner loop: chunks are written one after another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .memory import decoder_layers

TITANS_CONFIG_KEY = "forgetless_titans"


@dataclass
class TitansConfig:
    layers: list[int] = field(default_factory=lambda: [1])  # decoder layers that get a memory before them
    key_dim: int = 64  # width of q, k, v
    hidden: int = 128  # hidden width of the memory MLP
    chunk: int = 16  # tokens per memory write
    eta: float = 0.9  # momentum of the surprise
    theta: float = 0.5  # inner learning rate
    alpha: float = 0.01  # forgetting: weight decay of the memory per write

    def __post_init__(self) -> None:
        self.layers = [int(l) for l in ([self.layers] if isinstance(self.layers, int) else self.layers)]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"titans.layers must name distinct decoder layers, got {self.layers}.")
        if self.key_dim < 1 or self.hidden < 1 or self.chunk < 1:
            raise ConfigError("titans key_dim, hidden and chunk must be positive.")
        if not (0 <= self.eta < 1 and self.theta >= 0 and 0 <= self.alpha < 1):
            raise ConfigError("titans needs 0 <= eta < 1, theta >= 0 and 0 <= alpha < 1.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TitansConfig":
        return cls(**d)


def memory_update(params: list[torch.Tensor], surprise: list[torch.Tensor], grads: list[torch.Tensor],
                  eta: float, theta: float, alpha: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One write: S' = eta S - theta g;  M' = (1 - alpha) M + S'. Returns (M', S')."""
    new_s = [eta * s - theta * g for s, g in zip(surprise, grads)]
    return [(1 - alpha) * p + s for p, s in zip(params, new_s)], new_s


def memory_apply(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """M(x) for a batch of memories: params (B, h, m), (B, m, h); x (B, T, m) -> (B, T, m)."""
    w1, w2 = params
    return torch.bmm(F.silu(torch.bmm(x, w1.transpose(1, 2))), w2.transpose(1, 2))


def associative_loss(params: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each row's mean |M(k_t) - v_t|^2 (so each row's gradient is its own)."""
    return (memory_apply(params, k) - v).pow(2).sum(-1).mean(-1).sum()


class NeuralMemory(nn.Module):
    """The memory of one decoder layer (module docstring)."""

    def __init__(self, dim: int, cfg: TitansConfig, eps: float = 1e-6):
        super().__init__()
        self.cfg, self.eps = cfg, eps
        m, h = cfg.key_dim, cfg.hidden
        self.norm = nn.Parameter(torch.ones(dim))
        self.w_q = nn.Linear(dim, m, bias=False)
        self.w_k = nn.Linear(dim, m, bias=False)
        self.w_v = nn.Linear(dim, m, bias=False)
        self.w_o = nn.Linear(m, dim, bias=False)
        nn.init.zeros_(self.w_o.weight)
        self.m0_1 = nn.Parameter(torch.randn(h, m) / m ** 0.5)  # the initial memory M_0
        self.m0_2 = nn.Parameter(torch.randn(m, h) / h ** 0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The read y (B, T, dim) for hidden states h (B, T, dim)."""
        c = self.cfg
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        q = F.normalize(self.w_q(x), dim=-1)
        k = F.normalize(self.w_k(x), dim=-1)
        v = self.w_v(x)
        B = h.shape[0]
        params = [self.m0_1.expand(B, -1, -1), self.m0_2.expand(B, -1, -1)]
        surprise = [torch.zeros_like(p) for p in params]
        if c.theta == 0:  # no test-time writes: every token reads M_0
            return self.w_o(memory_apply(params, q)).to(h.dtype)
        create = self.training and torch.is_grad_enabled() and self.m0_1.requires_grad
        if not create:
            k, v = k.detach(), v.detach()
        reads = []
        T = h.shape[1]
        for a in range(0, T, c.chunk):
            e = min(a + c.chunk, T)
            reads.append(memory_apply(params, q[:, a:e]))  # read with the memory of chunks before this one
            if e == T:
                break
            with torch.enable_grad():
                p_in = params if create else [p.detach().requires_grad_() for p in params]
                grads = torch.autograd.grad(associative_loss(p_in, k[:, a:e], v[:, a:e]), p_in, create_graph=create)
            if not create:
                grads, params = [g.detach() for g in grads], [p.detach() for p in params]
            params, surprise = memory_update(params, surprise, list(grads), c.eta, c.theta, c.alpha)
        return self.w_o(torch.cat(reads, dim=1)).to(h.dtype)


def _pre_hook(layer: nn.Module, args: tuple, kwargs: dict):
    """Add the memory's read to the hidden states entering the decoder layer (MAL)."""
    if args:
        h = args[0]
        return (h + layer.titans(h), *args[1:]), kwargs
    h = kwargs["hidden_states"]
    return args, {**kwargs, "hidden_states": h + layer.titans(h)}


def add_titans(model: nn.Module, config: TitansConfig | None = None, **opts) -> nn.Module:
    """Give the chosen decoder layers of an HF Llama-style decoder a ``NeuralMemory`` (in place;
    the model's function is unchanged until W_o is trained). Recorded in ``model.config``."""
    cfg = config or TitansConfig(**opts)
    if getattr(model.config, TITANS_CONFIG_KEY, None):
        raise ConfigError("this model already has Titans memories; add all of them in one add_titans call.")
    blocks = decoder_layers(model)
    for i in cfg.layers:
        if not 0 <= i < len(blocks):
            raise ConfigError(f"titans layer {i} does not exist: the model has {len(blocks)} decoder layers.")
        ref = next(blocks[i].parameters())
        blocks[i].titans = NeuralMemory(model.config.hidden_size, cfg).to(device=ref.device)
        blocks[i].register_forward_pre_hook(_pre_hook, with_kwargs=True)
    setattr(model.config, TITANS_CONFIG_KEY, cfg.to_dict())
    return model


def titans_memories(model: nn.Module) -> list[NeuralMemory]:
    return [m for m in model.modules() if isinstance(m, NeuralMemory)]
