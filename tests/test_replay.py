"""Replay: reservoir sampling keeps every seen item with equal probability; the loss mixes replayed rows."""

import torch

from forgetless.methods import make_method
from forgetless.methods.replay import ReservoirBuffer


def test_reservoir_keeps_every_item_with_equal_probability():
    n, capacity, trials = 40, 10, 4000
    counts = [0] * n
    for t in range(trials):
        buf = ReservoirBuffer(capacity, seed=t)
        for i in range(n):
            buf.add(i)
        assert len(buf.items) == capacity and len(set(buf.items)) == capacity
        for i in buf.items:
            counts[i] += 1
    expected = trials * capacity / n  # 1000 per item
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    # 39 degrees of freedom: the 99.9% quantile of chi-square(39) is about 72.1
    assert chi2 < 72.1, (chi2, counts)
    # the first and the last quarter of the stream are kept equally often (within 5%)
    early, late = sum(counts[:10]), sum(counts[-10:])
    assert abs(early - late) < 0.05 * 10 * expected


def test_replay_mixes_replayed_rows_in_after_the_first_batch():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    method = make_method("replay", lr=1e-3, buffer_size=8, ratio=0.5)
    x = torch.randint(0, 32, (4, 6))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    seen = [method.before_batch(model, batch, s)["input_ids"].shape[0] for s in range(2)]
    assert seen == [4, 6] and method.buffer.seen == 8 and len(method.buffer.items) == 8


def test_replay_buffer_state_round_trips():
    a = make_method("replay", lr=1e-3, buffer_size=3, seed=5)
    for i in range(7):
        a.buffer.add((torch.arange(i + 1), torch.arange(i + 1)))
    b = make_method("replay", lr=1e-3, buffer_size=3, seed=99)
    b.load_state_tensors(a.state_tensors())
    assert b.buffer.seen == 7 and [x.tolist() for x, _ in b.buffer.items] == [x.tolist() for x, _ in a.buffer.items]
    for i in range(20):  # the same random choices from here on
        item = (torch.tensor([i]), torch.tensor([i]))
        a.buffer.add(item)
        b.buffer.add(item)
    assert [x.tolist() for x, _ in b.buffer.items] == [x.tolist() for x, _ in a.buffer.items]
