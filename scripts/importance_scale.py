"""How large the penalty of each quadratic-regularisation method is, to set its lambda.

Trains each of EWC, SI and MAS on the first topic of the domain stream (the settings of
``configs/domain-methods.yaml``), then prints the total importance sum(Omega) and the penalty
scale of one experience's move, sum(Omega * (theta_end - theta_start)^2). The configs set
lambda so that (lambda / 2) x that scale is a few tenths of a nat.

    OMP_NUM_THREADS=1 python scripts/importance_scale.py
"""

from __future__ import annotations

from forgetless.experiments.streams import StreamConfig, build_stream
from forgetless.methods import make_method
from forgetless.models.folder import default_model_dir, open_model
from forgetless.training import MethodContext, fit_experience

METHODS = {"ewc": {"fisher_batches": 8}, "si": {"xi": 1e-3}, "mas": {"mas_batches": 8}}


def main() -> None:
    d = default_model_dir()
    _, tok = open_model(d)
    ctx = MethodContext.for_folder(d, tok)
    cfg = StreamConfig(kind="domain", steps_per_experience=24, batch_size=16, seq_len=128, test_docs=20)
    exp = build_stream(d, tok, cfg, 0).experiences[0]
    print(f"first topic: {exp.name}, {exp.steps} steps, lr 3e-5")
    print("| method | sum Omega | sum Omega * dtheta^2 | lambda for 0.3 nat |")
    print("|---|---|---|---|")
    for name, opts in METHODS.items():
        method = make_method(name, lr=3e-5, lam=1.0, **opts)
        model = open_model(d)[0]
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        model = fit_experience(method, model, ctx, exp, progress=False).model
        omega = method.terms[-1][0]
        scale = sum(float((omega[n] * (p.detach() - start[n]) ** 2).sum()) for n, p in model.named_parameters()
                    if n in omega)
        total = method.importance_summary()["importance_sum"]
        print(f"| {name} | {total:.4g} | {scale:.3g} | {0.6 / scale:.2g} |", flush=True)


if __name__ == "__main__":
    main()
