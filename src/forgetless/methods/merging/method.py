"""Model merging as a continual-learning method: one expert per experience, all from the same base.

At every experience k (from 1):

1. ``setup`` puts the *base* weights theta_0 back into the model (theta_0 is remembered at the
   first ``setup`` and kept in ``state_tensors`` so a resumed run still has it) and trains every
   parameter like full fine-tuning (AdamW, lr 1e-5, weight decay 0.1; the memory value table
   gets dense gradients, ``sparse_values = False``).
2. ``export`` takes the expert's task vector tau_k = theta_k - theta_0 (parameters only), keeps
   it, merges tau_1..tau_k with ``how`` (see ``methods.merging``):

       task_arithmetic   d = sum_k tau_k
       ties              TIES: trim to top-``density`` per tensor, sign by total mass, disjoint mean
       dare / dare_ties  DARE drop-and-rescale (keep probability ``density``, fixed ``seed``),
                         summed, or with the TIES sign election and disjoint mean
       stitch            Localize-and-Stitch with dataless masks (top-``density`` of |tau_k|, over
                         the whole vector: ``mask_scope="global"``, or per tensor)
       stitch_learned    the same with masks learned on experience k's validation batches
                         (``mask_steps`` Adam steps, ``mask_lr``, L1 weight ``mask_l1``), binarised
                         to the same density; each mask is learned once and kept

   and returns theta_0 + lambda * d, with lambda in ``lambdas`` chosen by the lowest mean LM loss
   (``lm_loss_masked``) over ``valid_batches`` validation batches (``Experience.valid_batch``,
   drawn from *training* data) of every experience seen so far, averaged per experience first.
   Test data are never used. The choice and the validation losses of each lambda are kept in
   ``history`` (also in ``describe()`` and in the saved state).

Defaults: ``density`` 0.2 for ties (TIES' k = 20%), 0.1 for dare/dare_ties (DARE's p = 0.9),
0.01 for stitch/stitch_learned (Localize-and-Stitch's 1%); ``lambdas`` (0.25, 0.5, 0.75, 1, 1.5,
2, 3) for every rule (Localize-and-Stitch itself does not scale: lambda = 1 is in the grid);
``valid_batches`` 4; ``mask_steps`` 10, ``mask_lr`` 0.5, ``mask_l1`` 1.0.

With all task weights equal, TIES/DARE/stitch with weights lambda equal lambda times the merge
with weights 1 (the sign election uses the unweighted vectors), so one merge per experience is
scaled for the whole grid.

Buffers are never merged: the exported model carries theta_0's buffers (the memory layers'
query-whitening statistics, rotary tables ...), which ``forgetless run`` freezes anyway
(``freeze_query_stats``). Only parameters have task vectors. The state holds theta_0 and one
task vector per experience (a full copy of the parameters each; masks as booleans).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ..base import MethodContext, lm_loss_masked, nest, unnest, unnest_list
from ..full import FullFinetune
from . import rules as M

HOWS = ("task_arithmetic", "ties", "dare", "dare_ties", "stitch", "stitch_learned")
DEFAULT_DENSITY = {"task_arithmetic": 1.0, "ties": 0.2, "dare": 0.1, "dare_ties": 0.1, "stitch": 0.01,
                   "stitch_learned": 0.01}  # TIES k=20%, DARE p=0.9, Localize-and-Stitch 1%
DEFAULT_LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # sparse merges (TIES, stitch) often want > 1


class Merge(FullFinetune):
    name = "merge"
    needs_stream = True

    @dataclass
    class Options(FullFinetune.Options):
        how: str = "task_arithmetic"  # the merge rule (HOWS)
        density: float | None = None  # None: DEFAULT_DENSITY[how]
        lambdas: list[float] | float = field(default_factory=lambda: list(DEFAULT_LAMBDAS))
        valid_batches: int = 4  # validation batches per seen experience that choose lambda
        seed: int = 0
        sign: str = "total"  # TIES sign election
        mask_scope: str = "global"  # stitch: global | per tensor
        mask_steps: int = 10  # stitch_learned
        mask_lr: float = 0.5  # stitch_learned
        mask_l1: float = 1.0  # stitch_learned

        def validate(self) -> None:
            super().validate()
            self.one_of("how", HOWS)
            self.density = DEFAULT_DENSITY[self.how] if self.density is None else float(self.density)
            self.between("density", 0, 1, low_open=True)
            self.lambdas = [float(x) for x in ([self.lambdas] if isinstance(self.lambdas, (int, float))
                                               else self.lambdas)]
            self.require(bool(self.lambdas), "lambdas", "a list of at least one scaling value")
            self.positive("valid_batches", integer=True)
            self.one_of("sign", M.SIGN_METHODS)
            self.one_of("mask_scope", M.MASK_SCOPES)
            self.at_least("mask_steps", 0)
            self.positive("mask_lr")
            self.at_least("mask_l1", 0)

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        o = self.options
        self.how, self.density, self.lambdas, self.valid_batches = o.how, o.density, o.lambdas, o.valid_batches
        self.seed, self.sign, self.mask_scope = o.seed, o.sign, o.mask_scope
        self.mask_steps, self.mask_lr, self.mask_l1 = o.mask_steps, o.mask_lr, o.mask_l1
        self.base_params: dict[str, torch.Tensor] = {}
        self.base_buffers: dict[str, torch.Tensor] = {}
        self.taus: list[dict[str, torch.Tensor]] = []
        self.masks: list[dict[str, torch.Tensor]] = []  # stitch_learned only
        self.history: list[dict[str, Any]] = []  # per experience: chosen lambda and validation losses
        self._context: MethodContext | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, model: nn.Module, context: MethodContext) -> nn.Module:
        self._context = context
        if not self.base_params:
            self.base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.base_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        dev = next(model.parameters()).device  # after a resume, the loaded state is on the CPU
        self.base_params = {n: v.to(dev) for n, v in self.base_params.items()}
        self.base_buffers = {n: v.to(dev) for n, v in self.base_buffers.items()}
        self.taus = [{n: v.to(dev) for n, v in tau.items()} for tau in self.taus]
        self.masks = [{n: v.to(dev) for n, v in mask.items()} for mask in self.masks]
        self._restore_base(model)
        return super().setup(model, context)

    @torch.no_grad()
    def _restore_base(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        if set(params) != set(self.base_params):
            raise ConfigError("merge: the model's parameters differ from the remembered base; "
                              "resume with the same model.")
        for n, p in params.items():
            p.copy_(self.base_params[n].to(p.device))
        for n, b in model.named_buffers():
            if n in self.base_buffers:
                b.copy_(self.base_buffers[n].to(b.device))

    def _validation(self) -> list[list[dict]]:
        seen = (self._context.seen_experiences if self._context else None) or []
        seen = [e for e in seen if getattr(e, "valid_batch", None) is not None]
        if not seen:
            raise ConfigError("method merge needs the validation batches of the experiences seen so far "
                              "(context.seen_experiences, set by the lifecycle).")
        return [[e.valid_batch(i) for i in range(self.valid_batches)] for e in seen]

    def export(self, model: nn.Module) -> nn.Module:
        if not self.base_params:
            raise ConfigError("merge: export before setup; the base weights are unknown.")
        device = next(model.parameters()).device
        valid = [[{k: v.to(device) for k, v in b.items()} for b in bs] for bs in self._validation()]
        tau = M.task_vector({n: p.detach() for n, p in model.named_parameters()}, self.base_params)
        self.taus.append(tau)
        if self.how == "stitch_learned":
            base = {n: b.to(device) for n, b in self.base_params.items()}
            init = M.dataless_masks([tau], self.density, self.mask_scope)[0]
            self.masks.append(M.learn_mask(model, base, tau, init, valid[-1], lm_loss_masked, self.density,
                                           self.mask_steps, self.mask_lr, self.mask_l1, scope=self.mask_scope))
        delta = self.merged_delta()
        losses = []
        model.eval()
        for lam in self.lambdas:
            self._assign(model, delta, lam)
            losses.append(_mean_loss(model, valid))
        best = min(range(len(losses)), key=losses.__getitem__)
        self._assign(model, delta, self.lambdas[best])
        self.history.append({"experience": len(self.taus), "lambda": self.lambdas[best],
                             "valid_loss": {str(l): v for l, v in zip(self.lambdas, losses)}})
        return model

    def merged_delta(self) -> dict[str, torch.Tensor]:
        """The merge of all task vectors so far with unit weights (scaled by lambda afterwards)."""
        taus, w = self.taus, [1.0] * len(self.taus)
        if self.how == "task_arithmetic":
            return M.task_arithmetic(taus, w)
        if self.how == "ties":
            return M.ties(taus, w, self.density, sign=self.sign)
        if self.how in ("dare", "dare_ties"):
            return M.dare(taus, w, self.density, seed=self.seed, ties_sign=self.sign if self.how == "dare_ties" else None)
        masks = self.masks if self.how == "stitch_learned" else M.dataless_masks(taus, self.density, self.mask_scope)
        return M.stitch_delta(taus, masks)

    @torch.no_grad()
    def _assign(self, model: nn.Module, delta: dict[str, torch.Tensor], lam: float) -> None:
        """Model parameters <- theta_0 + lam * delta; buffers <- theta_0's."""
        self._restore_base(model)
        for n, p in model.named_parameters():
            p.copy_((self.base_params[n].to(p.device).float() + lam * delta[n].to(p.device)).to(p.dtype))

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = nest("base_param", self.base_params)
        out.update(nest("base_buffer", self.base_buffers))
        for k, tau in enumerate(self.taus):
            out.update(nest(f"tau.{k}", tau))
        for k, mask in enumerate(self.masks):
            out.update(nest(f"mask.{k}", mask))
        if self.history:
            out["history.lambda"] = torch.tensor([h["lambda"] for h in self.history], dtype=torch.float64)
            out["history.valid_loss"] = torch.tensor([[h["valid_loss"][str(l)] for l in self.lambdas]
                                                      for h in self.history], dtype=torch.float64)
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.base_params = unnest("base_param", state)
        self.base_buffers = unnest("base_buffer", state)
        self.taus, self.masks = unnest_list("tau", state), unnest_list("mask", state)
        self.history = []
        if "history.lambda" in state:
            lams, losses = state["history.lambda"].tolist(), state["history.valid_loss"].tolist()
            if losses and len(losses[0]) != len(self.lambdas):
                raise ConfigError("merge: the saved state used a different 'lambdas' grid; resume with the same options.")
            self.history = [{"experience": k + 1, "lambda": lam,
                             "valid_loss": {str(l): v for l, v in zip(self.lambdas, row)}}
                            for k, (lam, row) in enumerate(zip(lams, losses))]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "history": list(self.history)}


@torch.no_grad()
def _mean_loss(model: nn.Module, valid: list[list[dict]]) -> float:
    """Mean over experiences of the mean LM loss over that experience's validation batches."""
    per_exp = [sum(float(lm_loss_masked(model, b)) for b in bs) / len(bs) for bs in valid]
    return sum(per_exp) / len(per_exp)


def _alias(how: str) -> type[Merge]:
    """``merge`` with ``how`` fixed: its Options have ``how`` as a default that cannot be set."""
    opts = dataclass(type("Options", (Merge.Options,), {
        "__annotations__": {"how": "str"}, "how": field(default=how, init=False),
        "__qualname__": f"Merge_{how}.Options", "__module__": __name__}))
    return type(f"Merge_{how}", (Merge,), {"name": how, "Options": opts, "__module__": __name__,
                                             "__doc__": f"``merge`` with ``how={how!r}``."})


# registered aliases: e.g. {name: ties} is {name: merge, how: ties}
MERGE_METHODS: dict[str, type[Merge]] = {"merge": Merge, **{how: _alias(how) for how in HOWS}}
