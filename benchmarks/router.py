"""How well the `adapters` router picks the right experience for held-out inputs.

For each stream (the configs' domain and fact streams) and each router (`hidden`: cosine to
per-experience centroids of the base's mean hidden state; `tfidf`: nearest training sequence
by TF-IDF), the router is fitted exactly as in `forgetless run` (on `router_batches` training
batches per experience; the adapters themselves play no part in routing) and scored on every
experience's *test* inputs: domain windows of 128 tokens, fact question probes. Prints the
accuracy overall and per experience; chance is 1 / (number of experiences).

    OMP_NUM_THREADS=1 python benchmarks/router.py
"""

from __future__ import annotations

import time

from forgetless.experiments.streams import StreamConfig, build_stream
from forgetless.methods import MethodContext, make_method
from forgetless.methods.adapters import router_accuracy
from forgetless.models.folder import default_model_dir, open_model
from forgetless.training import fit_experience

STREAMS = {
    "domain": StreamConfig(kind="domain", steps_per_experience=24, batch_size=16, seq_len=128, test_docs=20),
    "facts": StreamConfig(kind="facts", experiences=4, facts_per_experience=5, steps_per_fact=4, questions=True),
}


def main() -> None:
    d = default_model_dir()
    print("| stream | router | accuracy | per experience | inputs | seconds |")
    print("|---|---|---|---|---|---|")
    for name, cfg in STREAMS.items():
        for router in ("hidden", "tfidf"):
            model, tok = open_model(d)
            stream = build_stream(d, tok, cfg, 0)
            method = make_method("adapters", rank=4, router=router, router_batches=16)
            ctx = MethodContext(tokenizer=tok)
            t0 = time.time()
            for k, exp in enumerate(stream.experiences):  # what the run does, minus the adapter training
                model = fit_experience(method, model, ctx, exp, k, stream.experiences[: k + 1], train=False,
                                       progress=False).model
            acc = router_accuracy(model.routes, stream, tok, seq_len=cfg.seq_len)
            per = ", ".join(f"{a:.2f}" for a in acc["per_experience"])
            print(f"| {name} | {router} | {acc['accuracy']:.3f} | {per} | {acc['n']} | {time.time() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
