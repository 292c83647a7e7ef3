"""Issue 15, first half: progressive networks, on-policy distillation and RL (GRPO-style) against SFT.

Core mathematics on hand-made tensors (group-relative advantages, the policy-gradient estimator,
the KL penalties, the reverse KL and its gradient on sampled tokens), prompts and rewards taken
from real training batches, the zero-forgetting test of progressive networks, and each method
through `forgetless run` with resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from forgetless.errors import ConfigError
from forgetless.methods import MethodContext, make_method
from forgetless.methods import rollouts as R
from forgetless.methods.onpolicy_distill import reverse_kl_full, reverse_kl_sampled
from forgetless.methods.progressive import ProgressiveModel, column_params
from forgetless.methods.rl import (
    group_advantages,
    kl_full,
    kl_k3,
    policy_gradient_loss,
    sft_batch,
)
from forgetless.training import Experience, fit_experience


# --------------------------------------------------------------------------- RL mathematics
def test_group_advantages_subtract_the_group_mean_and_optionally_divide_by_its_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    plain = group_advantages(r, 4)
    assert plain.tolist() == [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    scaled = group_advantages(r, 4, scale_std=True, eps=0.0)
    s2 = math.sqrt(0.75 * 0.25)  # population std of (1, 1, 1, 0)
    torch.testing.assert_close(scaled, torch.tensor([1.0, -1, -1, 1, 0.25 / s2, 0.25 / s2, 0.25 / s2, -0.75 / s2]))
    assert group_advantages(torch.ones(4), 4, scale_std=True).abs().max() == 0  # equal rewards: no signal


def test_policy_gradient_loss_gives_the_group_baseline_reinforce_gradient():
    z = torch.tensor([[[0.2, -1.0, 0.5], [1.0, 0.0, 0.0]],
                      [[0.0, 0.3, 0.3], [-0.4, 0.1, 2.0]]], requires_grad=True)  # (N=2, T=2, V=3)
    tokens = torch.tensor([[2, 0], [1, 1]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second completion has one token
    adv = torch.tensor([0.5, -0.5])
    loss = policy_gradient_loss(R.token_logprobs(z, tokens), mask, adv)
    loss.backward()
    q = z.detach().softmax(-1)
    want = torch.zeros_like(z)
    for i in range(2):
        n = mask[i].sum()
        for t in range(2):
            if mask[i, t]:  # d/dz of log softmax(z)[o] = onehot(o) - softmax(z)
                want[i, t] = -(adv[i] / 2) / n * (F.one_hot(tokens[i, t], 3).float() - q[i, t])
    torch.testing.assert_close(z.grad, want)
    # the value: - mean_i A_i mean_t log pi(o_it)
    lp = q.log()
    by_hand = -(0.5 * (lp[0, 0, 2] + lp[0, 1, 0]) / 2 - 0.5 * lp[1, 0, 1]) / 2
    torch.testing.assert_close(loss.detach(), by_hand)


def test_kl_penalties_full_and_k3_on_hand_numbers():
    pi = torch.tensor([0.5, 0.25, 0.25])
    ref = torch.tensor([0.25, 0.25, 0.5])
    mask = torch.ones(1, 1)
    full = kl_full(pi.log().view(1, 1, 3), ref.log().view(1, 1, 3), mask)
    want = 0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5)
    assert float(full) == pytest.approx(want, abs=1e-6)
    # k3 at a sampled token with pi = 0.5, ref = 0.25: d = log 0.5, exp(d) - d - 1 = 0.5 + ln 2 - 1
    k3 = kl_k3(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]), mask)
    assert float(k3) == pytest.approx(math.log(2) - 0.5, abs=1e-6)
    # k3 is unbiased: its expectation over o ~ pi is the full KL
    expect = sum(float(pi[v]) * float(kl_k3(pi[v].log().view(1, 1), ref[v].log().view(1, 1), mask)) for v in range(3))
    assert expect == pytest.approx(want, abs=1e-6)
    # masked positions do not count
    two = kl_full(torch.stack([pi.log(), ref.log()]).view(1, 2, 3), torch.stack([ref.log(), ref.log()]).view(1, 2, 3),
                  torch.tensor([[1.0, 0.0]]))
    assert float(two) == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- on-policy distillation
def test_reverse_kl_and_its_gradient_match_the_hand_formula():
    z = torch.tensor([[[1.0, -0.5, 0.2, 0.0]]], requires_grad=True)  # student logits at one sampled position
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    teacher = p.log().view(1, 1, 4)
    kl = reverse_kl_full(z, teacher, torch.ones(1, 1))
    q = z.detach().softmax(-1)[0, 0]
    want = float((q * (q.log() - p.log())).sum())
    assert float(kl.detach()) == pytest.approx(want, abs=1e-6)
    kl.backward()
    # d KL(q||p) / dz_k = q_k (log q_k - log p_k - KL)
    torch.testing.assert_close(z.grad[0, 0], q * (q.log() - p.log() - want))
    # reverse and forward differ: the student's mass is what is weighted
    fwd = float((p * (p.log() - q.log())).sum())
    assert abs(fwd - want) > 1e-3


def test_sampled_reverse_kl_surrogate_is_an_unbiased_gradient_of_the_reverse_kl():
    z0 = torch.tensor([0.3, -0.2, 1.1, 0.0, -1.0])
    p = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])
    teacher = p.log().view(1, 1, 5)
    q = z0.softmax(-1)
    expected = torch.zeros(5)
    for y in range(5):  # exact expectation over the sampled token y ~ q
        z = z0.clone().view(1, 1, 5).requires_grad_(True)
        reverse_kl_sampled(z, teacher, torch.tensor([[y]]), torch.ones(1, 1)).backward()
        expected += q[y] * z.grad[0, 0]
    z = z0.clone().view(1, 1, 5).requires_grad_(True)
    reverse_kl_full(z, teacher, torch.ones(1, 1)).backward()
    torch.testing.assert_close(expected, z.grad[0, 0])


# --------------------------------------------------------------------------- prompts, masks, rewards
@pytest.fixture(scope="module")
def tok():
    from forgetless.models.folder import default_model_dir
    from forgetless.models.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir())


def test_prompts_of_a_fact_batch_are_its_training_questions(tok):
    from forgetless.data.batches import fact_batch
    from forgetless.data.facts import Fact, question_lines

    f = Fact(id="capital:x", relation="capital", subject="Wakanda", answer="Birnin Zana",
             statement="Birnin Zana is the capital of Wakanda.",
             question="Question: Tell me the capital of Wakanda. Answer:",
             paraphrases=["The capital of Wakanda is Birnin Zana."])
    batch = fact_batch(tok, f, 8, "all", torch.device("cpu"), questions=True)
    prompts = R.prompts_from_batch(batch, tok, max_prompts=10)
    texts = [tok.decode(p.ids) for p in prompts]
    train_qs = [q.rsplit(" Answer:", 1)[0] + " Answer:" for q in question_lines(f)]
    assert texts and all(t in train_qs for t in texts)  # only training questions, each once
    assert len(set(texts)) == len(texts)
    assert f.question not in texts  # never the held-out probe
    assert all(p.answer == "Birnin Zana" and tok.decode(p.target).strip() == "Birnin Zana" for p in prompts)
    assert len(R.prompts_from_batch(batch, tok, max_prompts=2)) == 2


def test_prompts_of_label_and_text_batches(tok):
    prompt_ids = tok("Text: a river in the north Topic:", add_special_tokens=False)["input_ids"]
    label_ids = tok(" Rivers\n", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + label_ids + [tok.pad_token_id]])
    labels = torch.tensor([[-100] * len(prompt_ids) + label_ids + [-100]])
    mask = torch.tensor([[1] * (len(prompt_ids) + len(label_ids)) + [0]])
    (p,) = R.prompts_from_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, tok)
    assert p.ids == prompt_ids and p.target == label_ids and p.answer == "Rivers"
    window = torch.arange(10, 50).view(1, 40)
    (w,) = R.prompts_from_batch({"input_ids": window, "attention_mask": torch.ones_like(window),
                                 "labels": window.clone()}, tok, prompt_tokens=16, answer_tokens=8)
    assert w.ids == list(range(10, 26)) and w.target == list(range(26, 34)) and w.answer is None


def test_completion_mask_stops_after_the_first_stop_token():
    comp = torch.tensor([[5, 6, 9, 7], [9, 5, 5, 5], [5, 5, 5, 5]])
    assert R.completion_mask(comp, {9}).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_rewards_exact_answer_and_continuation_match(tok):
    prompt = tok("Question: What is the capital of Wakanda? Answer:", add_special_tokens=False)["input_ids"]
    good = tok(" Birnin Zana\n", add_special_tokens=False)["input_ids"]
    bad = tok(" Lagos\n", add_special_tokens=False)["input_ids"]
    prompts = [R.Prompt(prompt, good, "Birnin Zana"), R.Prompt([3, 4], [7, 8, 9, 10], None)]
    rows = [prompt + good, prompt + bad, [3, 4, 7, 8, 1, 1], [3, 4, 7, 0, 9, 10]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    comp = torch.zeros_like(ids)
    comp[0, len(prompt):len(prompt) + len(good)] = 1
    comp[1, len(prompt):len(prompt) + len(bad)] = 1
    comp[2, 2:6] = 1
    comp[3, 2:6] = 1
    roll = R.Rollout(ids, torch.ones_like(ids), comp, [0, 0, 1, 1])
    assert R.rewards(roll, prompts, tok).tolist() == [1.0, 0.0, 0.5, 0.75]


def test_sft_batch_puts_the_loss_on_the_gold_continuation_only():
    b = sft_batch([R.Prompt([5, 6], [7, 8], "x"), R.Prompt([5], [9], "y")], pad=1)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("name,opts,needle", [
    ("rl", {"objective": "ppo"}, "objective"),
    ("rl", {"group_size": 1}, "group_size"),
    ("rl", {"kl_estimator": "k2"}, "kl_estimator"),
    ("onpolicy_distill", {"teacher": "oracle"}, "teacher"),
    ("onpolicy_distill", {"estimator": "k3"}, "estimator"),
    ("progressive", {"width": 0}, "width"),
    ("progressive", {"router": "knn"}, "router"),
    ("progressive", {"colour": 1}, "colour"),
])
def test_bad_options_raise_config_errors(name, opts, needle):
    with pytest.raises(ConfigError, match=needle):
        make_method(name, **opts)


# --------------------------------------------------------------------------- progressive networks
def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def fake_experience(k: int, steps: int, lo: int) -> Experience:
    def batch(step: int) -> dict:
        g = torch.Generator().manual_seed(1000 * k + step)
        x = torch.randint(lo, lo + 16, (4, 12), generator=g)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    return Experience(f"e{k}", batch, steps, test=None, valid_batch=lambda i: batch(100 + i))


def drive(method, model, exps, start: int = 0):
    """Experiences ``start..`` through the one lifecycle, as `forgetless run` does."""
    ctx = MethodContext()
    for k, exp in enumerate(exps[start:], start):
        model = fit_experience(method, model, ctx, exp, k, exps[: k + 1], progress=False).model
    return model


PROBE = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(7))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE, attention_mask=torch.ones_like(PROBE)).logits


def test_progressive_columns_leave_earlier_experiences_bit_identical():
    model = tiny_llama()
    base_logits = logits(model)
    base_state = {n: p.detach().clone() for n, p in model.state_dict().items()}
    exps = [fake_experience(k, 4, lo=3 + 20 * k) for k in range(3)]
    method = make_method("progressive", lr=1e-2, width=8, router="tfidf", router_batches=2)
    m = drive(method, model, exps[:1])
    assert isinstance(m, ProgressiveModel)
    told = []
    m.set_experience(0)
    told.append(logits(m))
    assert not torch.allclose(told[0], base_logits)  # the column learned something
    m.set_experience(1)
    assert torch.equal(logits(m), base_logits)  # no column 1 yet: the bare base
    m = drive(method, m, exps[:2], start=1)
    m.set_experience(1)
    told.append(logits(m))
    m = drive(method, m, exps, start=2)
    for j in range(2):  # after two (one) later experiences, bit for bit
        m.set_experience(j)
        assert torch.equal(logits(m), told[j]), j
    m.set_experience(2)
    assert not torch.allclose(logits(m), told[1])
    m.set_experience(None)
    # the base never changed; the laterals exist and were trained
    assert all(torch.equal(v, base_state[n]) for n, v in m.base.state_dict().items())
    assert len(m.columns[2].lateral[1]) == 2 and len(m.columns[2].lateral[0]) == 0
    assert m.columns[2].lateral[1][0].weight.abs().sum() > 0
    # parameter growth: L (2 d w + w) + (L - 1) k w^2 per column
    assert method.growth() == [column_params(3, 32, 8, k) for k in range(3)]
    assert method.growth() == [3 * (2 * 32 * 8 + 8) + 2 * k * 64 for k in range(3)]
    assert method.describe()["growth"] == method.growth()
    # the router sends held-out batches of disjoint token bands to their own column
    for k, e in enumerate(exps):
        b = e.valid_batch(5)
        assert m.routes(b["input_ids"], b["attention_mask"]) == [k] * 4
    assert method.valid_accuracy[-1] == 1.0
    # generation works per column, with the KV cache (the columns are per token)
    m.set_experience(0)
    gen = m.generate(input_ids=PROBE[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3,
                     do_sample=False, pad_token_id=0)
    step = PROBE[:1, :4]
    for _ in range(3):  # greedy without the cache, one forward per token
        with torch.no_grad():
            nxt = m(input_ids=step, attention_mask=torch.ones_like(step)).logits[:, -1].argmax(-1, keepdim=True)
        step = torch.cat([step, nxt], 1)
    assert torch.equal(gen, step)
    m.set_experience(None)
    # the state round-trips: a fresh method rebuilds the same columns on the plain base
    fresh = make_method("progressive", lr=1e-2, width=8, router="tfidf", router_batches=2)
    fresh.load_state_tensors(method.state_tensors())
    assert fresh.valid_accuracy == method.valid_accuracy and fresh.growth() == method.growth()
    rebuilt = fresh._rebuild(method.checkpoint_model(m))
    for j in range(3):
        rebuilt.set_experience(j)
        m.set_experience(j)
        assert torch.equal(logits(rebuilt), logits(m))


# --------------------------------------------------------------------------- `forgetless run`
TINY = """
name: m15a
seed: 1
experiments:
  - name: domain
    stream: {kind: domain, experiences: 2, steps_per_experience: 2, batch_size: 4, seq_len: 32, test_docs: 2,
             eval_every: 0, general_tokens: 256}
    methods:
      - {name: rl, lr: 1.0e-4, prompts: 2, group_size: 2, max_new_tokens: 4}
      - {name: onpolicy_distill, lr: 1.0e-4, prompts: 2, samples: 1, max_new_tokens: 4}
      - {name: progressive, lr: 1.0e-3, width: 8, router_batches: 2}
  - name: facts
    stream: {kind: facts, experiences: 2, facts_per_experience: 1, steps_per_fact: 2, batch_size: 4, eval_every: 0,
             questions: true, general_tokens: 256}
    methods:
      - {name: rl, lr: 1.0e-4, prompts: 2, group_size: 2, max_new_tokens: 4}
      - {name: rl, label: rl_sft, lr: 1.0e-4, objective: sft, prompts: 2}
      - {name: onpolicy_distill, lr: 1.0e-4, teacher: before, prompts: 2, samples: 1, max_new_tokens: 4, estimator: sampled}
"""


@pytest.mark.e2e
def test_methods_15a_run_end_to_end_and_resume_to_the_same_matrix(tmp_path, quick_runs, interrupt_run):
    from forgetless.experiments.runner import load_run_config, run

    p = tmp_path / "run.yaml"
    p.write_text(TINY)
    full = run(load_run_config(p), tmp_path / "full", progress=False, log=lambda s: None)
    for exp, labels in (("domain", ("rl", "onpolicy_distill", "progressive")),
                        ("facts", ("rl", "rl_sft", "onpolicy_distill"))):
        for label in labels:
            m = full[exp]["methods"][label]
            assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"]), (exp, label)
    assert len(full["domain"]["methods"]["rl"]["method"]["mean_reward"]) == 2
    assert len(full["domain"]["methods"]["progressive"]["method"]["growth"]) == 2
    # interrupt each sampled / growing method after its first experience; the resumed R is the same
    p.write_text(TINY.split("  - name: facts")[0])  # the domain experiment alone: same seed, same stream
    interrupt_run(lambda n, state_dir: n % 2 == 1)
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    interrupt_run(None)
    logs = []
    resumed = run(load_run_config(p), tmp_path / "resumed", progress=False, log=logs.append)["domain"]
    assert sum("resuming after experience 1 of 2" in line for line in logs) == 1  # progressive (the others finished)
    for label in ("rl", "onpolicy_distill", "progressive"):
        assert resumed["methods"][label]["R"] == full["domain"]["methods"][label]["R"], label
        same = json.loads(json.dumps(full["domain"]["methods"][label]["method"]))  # as read back from a saved record
        assert json.loads(json.dumps(resumed["methods"][label]["method"])) == same, label
