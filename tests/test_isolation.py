"""Parameter isolation: PackNet's owner masks and its exact inference rule, task adapters behind a
router (routing rules, accuracy on the shipped base's held-out inputs, parameter growth), and
both methods through `forgetless run` with resume."""

import pytest
import torch
import transformers

from forgetless.experiments.runner import load_run_config, run
from forgetless.methods import MethodContext, make_method
from forgetless.methods.adapters import (
    AdapterRouterModel,
    Router,
    router_accuracy,
    spread_steps,
)
from forgetless.methods.lora import LoRA
from forgetless.methods.packnet import PackNet, PackNetModel, prune_free_entries
from forgetless.training import Experience, fit_experience

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def fake_experience(k: int, steps: int, lo: int) -> Experience:
    """Token ids from a band of the vocabulary of its own (lo .. lo+15), so experiences differ."""
    def batch(step: int) -> dict:
        g = torch.Generator().manual_seed(1000 * k + step)
        x = torch.randint(lo, lo + 16, (4, 12), generator=g)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    return Experience(f"e{k}", batch, steps, test=None, valid_batch=lambda i: batch(100 + i))


def drive(method, model, exps, start: int = 0, train: bool = True, seen: bool = True):
    """Experiences ``start..`` through the one lifecycle, as `forgetless run` does."""
    ctx = MethodContext()
    for k, exp in enumerate(exps[start:], start):
        model = fit_experience(method, model, ctx, exp, k, exps[: k + 1] if seen else [], progress=False,
                               train=train).model
    return model


PROBE = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(7))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE, attention_mask=torch.ones_like(PROBE)).logits


# --------------------------------------------------------------------------- PackNet
def test_prune_free_entries_keeps_the_top_fraction_of_free_entries():
    owner = torch.tensor([[0, 1, 0], [0, 0, 2]], dtype=torch.int16)
    score = torch.tensor([[5.0, 9.0, 1.0], [3.0, 2.0, 8.0]])  # owned 9 and 8 must not be taken
    reset = prune_free_entries(owner, score, 3, keep=0.5)  # 4 free entries -> keep round(2.0) = 2
    assert owner.tolist() == [[3, 1, 0], [3, 0, 2]]
    assert reset.tolist() == [[False, False, True], [False, True, False]]
    owner2 = torch.zeros(10, dtype=torch.int16)
    prune_free_entries(owner2, torch.arange(10.0), 1, keep=0.26)  # round(2.6) = 3: the three largest
    assert owner2.tolist() == [0] * 7 + [1] * 3


@pytest.mark.parametrize("reset", ["base", "zero"])
def test_packnet_masks_are_disjoint_and_a_frozen_experience_is_bit_exact(reset):
    model = tiny_llama()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    exps = [fake_experience(k, 4, lo=3 + 16 * k) for k in range(3)]
    method = PackNet(lr=1e-2, keep=0.5, retrain_fraction=0.5, reset=reset, weight_decay=0.1)

    m1 = drive(method, model, exps[:1])
    assert isinstance(m1, PackNetModel)
    owners1 = {n: o.clone() for n, o in method.owners.items()}
    plain1 = {n: p.detach().clone() for n, p in m1.model.named_parameters()}
    m1.set_experience(0)
    after1 = logits(m1)
    m1.set_experience(None)
    assert torch.equal(logits(m1), after1)  # nothing owned later yet: both rules agree

    m2 = drive(method, m1, exps[:2], start=1)
    m2.set_experience(0)
    assert torch.equal(logits(m2), after1)  # bit for bit, after AdamW with weight decay trained experience 2
    m2.set_experience(None)
    after2 = logits(m2)
    assert not torch.allclose(after2, after1)  # experience 2 did change the model
    owners2 = {n: o.clone() for n, o in method.owners.items()}

    m3 = drive(method, m2, exps, start=2)
    for j, want in ((0, after1), (1, after2)):
        m3.set_experience(j)
        assert torch.equal(logits(m3), want)
    m3.set_experience(None)
    assert not torch.allclose(logits(m3), after2)

    assert len(method.owners) == 2 * 7
    for n, o in method.owners.items():
        o1 = owners1[n]
        assert torch.equal(o[o1 == 1], o1[o1 == 1])  # experience 1 keeps what it owned
        assert (o1[o == 2] == 0).all()  # experience 2 took only entries free after experience 1
        assert int((o == 1).sum()) == round(0.5 * o.numel())  # pruning kept the requested fraction
        assert int((o == 2).sum()) == round(0.5 * int((o1 == 0).sum()))
        assert int((o == 3).sum()) == round(0.5 * int((owners2[n] == 0).sum()))
        assert torch.equal(o[owners2[n] > 0], owners2[n][owners2[n] > 0])
        w = dict(m3.model.named_modules())[n].weight
        assert torch.equal(w[o == 1], plain1[n + ".weight"][o == 1])  # owned by 1: untouched by experience 2
        free = init[n + ".weight"][o == 0] if reset == "base" else torch.zeros(int((o == 0).sum()))
        assert torch.equal(w[o == 0], free)  # free entries hold their free value
    for n, p in m3.model.named_parameters():  # embeddings, norms, lm_head: frozen for the whole stream
        if n.rsplit(".", 2)[-2] not in TARGETS:
            assert torch.equal(p, init[n]), n
    assert method.growth() == [sum(int((o == k).sum()) for o in method.owners.values()) for k in (1, 2, 3)]
    d = method.describe()
    assert d["growth"] == method.growth() and d["free_params"] + sum(d["growth"]) == d["linear_params"]

    # the state round-trips: a fresh method object resumes with the same owner maps and free values
    fresh = PackNet(lr=1e-2, keep=0.5, retrain_fraction=0.5, reset=reset)
    fresh.load_state_tensors(method.state_tensors())
    assert fresh.done == 3 and all(torch.equal(fresh.owners[n], o) for n, o in method.owners.items())


def test_packnet_prunes_after_the_training_fraction_and_falls_back_at_export():
    method = PackNet(lr=1e-2, keep=0.25, retrain_fraction=0.3)
    calls = []
    orig = method.prune
    method.prune = lambda: (calls.append(1), orig())
    model = tiny_llama()
    steps_seen = []
    after = method.after_step
    method.after_step = lambda m, s: (after(m, s), steps_seen.append((s, method._pruned, method._prune_at)))
    fit_experience(method, model, MethodContext(), fake_experience(0, 10, 3), progress=False)
    assert steps_seen[0][2] == 7  # ceil(0.7 * 10)
    assert [s for s, pruned, _ in steps_seen if pruned][0] == 6 and len(calls) == 1  # pruned once, after step 6
    # without the experience in the context: no retraining phase, pruning happens at export
    method2 = PackNet(lr=1e-2, keep=0.25)
    m = method2.setup(tiny_llama(), MethodContext())
    assert method2._prune_at is None and not method2._pruned
    method2.export(m)
    assert method2.growth() == [sum(round(0.25 * o.numel()) for o in method2.owners.values())]


@pytest.mark.parametrize("name,opts,needle", [
    ("packnet", {"keep": 1.5}, "packnet option 'keep' must be a fraction"),
    ("packnet", {"retrain_fraction": 1.0}, "retrain_fraction"),
    ("packnet", {"reset": "random"}, "packnet option 'reset' must be one of"),
    ("adapters", {"router": "oracle"}, "adapters option 'router' must be one of"),
    ("adapters", {"rank": 0}, "adapters option 'rank' must be a positive integer"),
    ("adapters", {"ranks": 4}, "unknown config key 'adapters.ranks'"),
])
def test_bad_options_raise_config_errors(name, opts, needle):
    from forgetless.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        make_method(name, **opts)


# --------------------------------------------------------------------------- adapters and router
def test_router_rules_on_hand_made_statistics():
    r = Router("hidden")
    r.add(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.2, 0.0]]), None)
    r.add(torch.tensor([[0.0, 1.0, 0.0]]), None)
    r.add(torch.tensor([[0.0, 0.0, 1.0]]), None)
    assert r.route(torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.0, 0.8], [0.2, 0.9, 0.1]]), None).tolist() == [0, 2, 1]
    t = Router("tfidf")
    t.add(None, torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]))  # experience 0: two sequences
    t.add(None, torch.tensor([[0.0, 1.0, 0.0, 3.0]]))
    # token 1 is in every sequence (idf 1); idf of a token in one sequence of three is ln(4/2) + 1
    s = t.scores(None, torch.tensor([[0.0, 5.0, 1.0, 0.0]]))
    idf = torch.tensor([1.693147, 1.0, 1.693147, 1.693147])
    q = torch.nn.functional.normalize(torch.tensor([0.0, 5.0, 1.0, 0.0]) * idf, dim=0)
    want0 = max(float(q @ torch.nn.functional.normalize(torch.tensor(v) * idf, dim=0))
                for v in ([2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]))
    want1 = float(q @ torch.nn.functional.normalize(torch.tensor([0.0, 1.0, 0.0, 3.0]) * idf, dim=0))
    assert s[0].tolist() == pytest.approx([want0, want1], abs=1e-5) and t.route(None, q[None]).item() == 0
    assert spread_steps(40, 16)[:4] == [0, 3, 5, 8] and spread_steps(40, 16)[-1] == 39 and spread_steps(2, 16) == [0, 1]


def test_adapters_grow_by_one_lora_each_and_keep_earlier_experiences_exact():
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    exps = [fake_experience(k, 3, lo=3 + 30 * k) for k in range(2)]
    method = make_method("adapters", lr=1e-2, rank=4, router_batches=2, router="tfidf")
    m1 = drive(method, model, exps[:1])
    assert isinstance(m1, AdapterRouterModel)
    m1.set_experience(0)
    told1 = logits(m1)
    m1.set_experience(None)
    m2 = drive(method, m1, exps, start=1)
    m2.set_experience(0)
    assert torch.equal(logits(m2), told1)  # adapter e0 is untouched by training e1
    m2.set_experience(1)
    assert not torch.allclose(logits(m2), told1)
    m2.set_experience(None)

    lora = LoRA(lr=1e-2, rank=4)
    lora.setup(tiny_llama(), MethodContext())
    per_adapter = 2 * (4 * 4 * (32 + 32) + 3 * 4 * (32 + 64))  # 2 layers x (4 attention + 3 MLP) x r (in + out)
    assert lora.trainable_params_per_step() == per_adapter and method.growth() == [per_adapter] * 2
    plain = method.checkpoint_model(m2)  # a plain copy with the base weights, the wrapper keeps working
    assert isinstance(plain, transformers.LlamaForCausalLM) and set(plain.state_dict()) == set(base)
    assert all(torch.equal(plain.state_dict()[n], v) for n, v in base.items())
    # the router sends held-out batches to their own adapter (disjoint token bands: TF-IDF is exact)
    for k, e in enumerate(exps):
        b = e.valid_batch(5)
        assert m2.routes(b["input_ids"], b["attention_mask"]) == [f"e{k}"] * 4
    assert method.valid_accuracy[-1] == 1.0
    # a fresh method resumes from the state: same adapters, same routed outputs
    fresh = make_method("adapters", lr=1e-2, rank=4, router_batches=2, router="tfidf")
    fresh.load_state_tensors(method.state_tensors())
    rebuilt = fresh._rebuild(plain)
    assert torch.equal(logits(rebuilt), logits(m2))


@pytest.mark.e2e
def test_router_accuracy_on_the_shipped_domain_stream():
    """Measured (seed 0, 2 router batches per topic, 110 test windows of 128 tokens): 0.88."""
    from forgetless.experiments.streams import StreamConfig, build_stream
    from forgetless.models.folder import default_model_dir, open_model
    from forgetless.models.memory import freeze_query_stats

    model, tok = open_model(default_model_dir())
    freeze_query_stats(model)
    stream = build_stream(default_model_dir(), tok, StreamConfig(kind="domain", steps_per_experience=2), 0)
    assert len(stream.experiences) == 4
    method = make_method("adapters", lr=1e-4, rank=4, router_batches=2)
    wrapper = drive(method, model, stream.experiences, train=False, seen=False)  # routing uses the base only
    acc = router_accuracy(wrapper.routes, stream, tok, seq_len=128)
    assert acc["n"] == 110 and acc["accuracy"] == pytest.approx(0.88, abs=0.03)
    assert min(acc["per_experience"]) >= 0.6  # chance is 0.25


# --------------------------------------------------------------------------- `forgetless run`
TINY = """
name: iso
seed: 3
experiments:
  - name: domain
    stream: {kind: domain, experiences: 2, steps_per_experience: 2, batch_size: 4, seq_len: 64, test_docs: 2,
             eval_every: 1, general_tokens: 256}
    methods:
      - {name: packnet, lr: 1.0e-3, keep: 0.5, retrain_fraction: 0.5}
      - {name: adapters, lr: 1.0e-3, rank: 4, router_batches: 2}
  - name: facts
    stream: {kind: facts, material: statements, experiences: 2, facts_per_experience: 2, steps_per_fact: 1, batch_size: 4, eval_every: 0,
             general_tokens: 256}
    methods:
      - {name: packnet, lr: 1.0e-3}
      - {name: adapters, lr: 1.0e-3, rank: 4, router: tfidf}
"""


@pytest.mark.e2e
def test_isolation_methods_run_end_to_end_and_resume_to_the_same_matrix(tmp_path, quick_runs, interrupt_run):
    p = tmp_path / "run.yaml"
    p.write_text(TINY)
    full = run(load_run_config(p), tmp_path / "full", progress=False, log=lambda s: None)
    for exp in ("domain", "facts"):
        for method in ("packnet", "adapters"):
            R = full[exp]["methods"][method]["R"]
            assert len(R) == 2 and all(len(row) == 2 for row in R)
    assert full["facts"]["methods"]["packnet"]["R"][0][0] == 1.0  # it learns the first two facts

    # interrupt after packnet's first experience, then after adapters' first one; resume each time
    p.write_text(TINY.split("  - name: facts")[0])  # the domain experiment alone: same seed, same stream
    interrupt_run(lambda n, state_dir: n in (1, 3))
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    interrupt_run(None)
    logs = []
    resumed = run(load_run_config(p), tmp_path / "resumed", progress=False, log=logs.append)["domain"]
    assert sum("resuming after experience 1 of 2" in line for line in logs) == 1  # adapters (packnet is done)
    for method in ("packnet", "adapters"):
        assert resumed["methods"][method]["R"] == full["domain"]["methods"][method]["R"], method
