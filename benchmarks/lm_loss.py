"""The language-model loss on scored positions only against the full-logits loss, on fact batches.

    python benchmarks/lm_loss.py [--reps 15] [--threads N]

``forgetless.training.losses.lm_loss_masked`` hands the LM head only the hidden states of the
positions that predict a label; the baseline computes the logits of every position and then the
shifted cross-entropy with -100 ignored (the loss before that change). Both run forward and
backward, interleaved, on the same batches of the shipped base: 16 teaching lines of one fact with
the loss on all tokens (statements, and the augmented material of ``learn``) and on the answer only,
for full fine-tuning (every parameter) and for sparse memory finetuning (only the memory values
train: no gradient below the memory layer). Printed: median ms per forward+backward, the share of
positions scored, and the ratio new / full logits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from forgetless.runtime import keep_freed_memory


def main() -> None:
    malloc = keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from forgetless.data.batches import fact_batch
    from forgetless.data.facts import read_builtin_facts
    from forgetless.models.folder import default_model_dir, open_model
    from forgetless.models.memory import memory_layers
    from forgetless.models.precision import autocast_dtype, describe
    from forgetless.training.losses import lm_loss_masked, shifted_cross_entropy

    base = default_model_dir()
    model, tok = open_model(base)
    dtype = autocast_dtype("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {describe()}, "
          f"{'bf16 autocast' if dtype else 'fp32'}, malloc: {malloc}")
    facts = read_builtin_facts(base / "facts_new.jsonl")[:8]
    cases = {
        "statements, loss on all tokens": [fact_batch(tok, f, 16, "all") for f in facts],
        "augmented, loss on all tokens": [fact_batch(tok, f, 16, "all", material="augmented") for f in facts],
        "augmented, loss on the answer": [fact_batch(tok, f, 16, "answer", material="augmented") for f in facts],
    }

    def full_logits(m, b):
        return shifted_cross_entropy(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    def step(loss_fn, b) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = loss_fn(model, b)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    print("| trained | batches | positions scored | full logits ms | scored only ms | ratio |")
    print("|---|---|---|---|---|---|")
    for trained in ("every parameter", "memory values only"):
        for p in model.parameters():
            p.requires_grad_(trained == "every parameter")
        if trained != "every parameter":
            for mem in memory_layers(model):
                mem.values.requires_grad_(True)
        model.train()
        for name, batches in cases.items():
            share = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) / sum(b["labels"].numel() for b in batches)
            for b in batches[:2]:  # warm-up
                step(full_logits, b), step(lm_loss_masked, b)
            old, new = [], []
            for r in range(args.reps):
                b = batches[r % len(batches)]
                old.append(step(full_logits, b))
                new.append(step(lm_loss_masked, b))
            o, n = 1e3 * statistics.median(old), 1e3 * statistics.median(new)
            print(f"| {trained} | {name} | {share:.0%} | {o:.1f} | {n:.1f} | {n / o:.2f}x |")


if __name__ == "__main__":
    main()
