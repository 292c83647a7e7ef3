"""Issue 15 (second half): Titans test-time memory, Cartridges, ROME and MEMIT.

Core mathematics on hand-made tensors, then each method end to end on tiny streams with resume."""

import pytest
import torch

from forgetless.methods import make_method
from forgetless.methods.adapters import Router
from forgetless.methods.cartridges import (
    Cartridge,
    CartridgeLM,
    cartridge_forward,
    distillation_loss,
    prefix_kv,
)
from forgetless.methods.editing import memit_delta, rome_update
from forgetless.models.titans import (
    NeuralMemory,
    TitansConfig,
    add_titans,
    associative_loss,
    memory_apply,
    memory_update,
)


def tiny(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


# --------------------------------------------------------------------------- Titans
def test_titans_update_rule_momentum_and_decay_by_hand():
    M = [torch.tensor([[1.0, -2.0], [0.5, 0.0]])]
    S = [torch.tensor([[0.2, 0.0], [-0.4, 1.0]])]
    g = [torch.tensor([[1.0, 1.0], [0.0, -2.0]])]
    eta, theta, alpha = 0.9, 0.5, 0.1
    M1, S1 = memory_update(M, S, g, eta, theta, alpha)
    # S1 = 0.9*S - 0.5*g ; M1 = 0.9*M + S1
    want_s = torch.tensor([[0.18 - 0.5, -0.5], [-0.36, 0.9 + 1.0]])
    want_m = torch.tensor([[0.9 + want_s[0, 0], -1.8 + want_s[0, 1]], [0.45 + want_s[1, 0], want_s[1, 1]]])
    torch.testing.assert_close(S1[0], want_s)
    torch.testing.assert_close(M1[0], want_m)
    # a second write with zero gradient: the surprise keeps moving the memory (momentum), decay shrinks it
    M2, S2 = memory_update(M1, S1, [torch.zeros(2, 2)], eta, theta, alpha)
    torch.testing.assert_close(S2[0], 0.9 * want_s)
    torch.testing.assert_close(M2[0], 0.9 * want_m + 0.9 * want_s)


def test_titans_associative_gradient_and_one_write_of_the_module():
    torch.manual_seed(0)
    cfg = TitansConfig(layers=[0], key_dim=4, hidden=6, chunk=3, eta=0.8, theta=0.3, alpha=0.05)
    mem = NeuralMemory(8, cfg).eval()
    torch.nn.init.normal_(mem.w_o.weight)
    h = torch.randn(1, 6, 8)
    y = mem(h)
    # by hand: chunk 1 reads M_0; chunk 2 reads M_1 = (1 - alpha) M_0 + (0 - theta * grad)
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * mem.norm
    q = torch.nn.functional.normalize(mem.w_q(x), dim=-1)
    k = torch.nn.functional.normalize(mem.w_k(x), dim=-1)
    v = mem.w_v(x)
    P0 = [mem.m0_1.detach()[None].clone().requires_grad_(), mem.m0_2.detach()[None].clone().requires_grad_()]
    loss = ((memory_apply(P0, k[:, :3]) - v[:, :3]) ** 2).sum(-1).mean()
    g = torch.autograd.grad(loss, P0)
    P1 = [0.95 * p.detach() - 0.3 * gi for p, gi in zip(P0, g)]
    torch.testing.assert_close(y[:, :3], mem.w_o(memory_apply([p.detach() for p in P0], q[:, :3])))
    torch.testing.assert_close(y[:, 3:], mem.w_o(memory_apply(P1, q[:, 3:])))
    # the write lowers the associative loss on the chunk it wrote
    assert associative_loss(P1, k[:, :3].detach(), v[:, :3].detach()) < loss
    # no token reads a memory that has seen it: changing chunk 2 leaves chunk 1's read unchanged
    h2 = h.clone()
    h2[:, 3:] += 1.0
    torch.testing.assert_close(mem(h2)[:, :3], y[:, :3])


def test_titans_option_leaves_the_model_unchanged_and_survives_save_load(tmp_path):
    from forgetless.models.checkpoint import load_model, save_model

    model = tiny()
    x = torch.randint(3, 32, (2, 20))
    before = model(input_ids=x).logits
    add_titans(model, TitansConfig(layers=[1], key_dim=4, hidden=8, chunk=5))
    torch.testing.assert_close(model(input_ids=x).logits, before)  # W_o starts at zero
    torch.nn.init.normal_(model.model.layers[1].titans.w_o.weight)
    changed = model(input_ids=x).logits
    assert not torch.allclose(changed, before)
    save_model(model, tmp_path / "m")
    torch.testing.assert_close(load_model(tmp_path / "m")(input_ids=x).logits, changed)


# --------------------------------------------------------------------------- ROME / MEMIT
def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T + n * torch.eye(n, dtype=torch.float64)


def test_rome_edit_maps_the_key_to_the_new_value_and_keeps_c_orthogonal_keys():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 7, generator=g, dtype=torch.float64)
    C = _spd(7, 2)
    k = torch.randn(7, generator=g, dtype=torch.float64)
    v = torch.randn(5, generator=g, dtype=torch.float64)
    W2 = rome_update(W, C, k, v)
    torch.testing.assert_close(W2 @ k, v)
    u = torch.linalg.solve(C, k)  # C^-1 k
    other = torch.randn(7, generator=g, dtype=torch.float64)
    other = other - (u @ other) / (u @ u) * u  # (C^-1 k)^T other = 0
    assert abs(float(u @ other)) < 1e-10
    torch.testing.assert_close(W2 @ other, W @ other)
    assert torch.linalg.matrix_rank(W2 - W) == 1


def test_memit_delta_is_the_least_squares_solution_of_a_direct_solve():
    g = torch.Generator().manual_seed(3)
    d_in, d_out, n, lam = 6, 4, 3, 2.5
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    V = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    C = _spd(d_in, 4) / d_in
    got = memit_delta(K, V - W @ K, C, lam)
    # direct: W' = argmin |W' K - V|^2 + lam |(W' - W) L|^2 with C = L L^T, stacked least squares
    L = torch.linalg.cholesky(C)
    A = torch.cat([K.T, lam ** 0.5 * L.T])  # (n + d_in, d_in)
    B = torch.cat([V.T, lam ** 0.5 * (W @ L).T])  # (n + d_in, d_out)
    W_direct = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(W + got, W_direct)
    # a small lam puts the keys (nearly) on their targets
    torch.testing.assert_close((W + memit_delta(K, V - W @ K, C, 1e-9)) @ K, V, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- Cartridges
def test_cartridge_shape_storage_and_prefix_equals_the_text_in_context():
    model = tiny()
    x = torch.randint(3, 32, (1, 12))
    keys, values = prefix_kv(model, x[0, :5])
    assert len(keys) == 2 and keys[0].shape == (5, 2, 8) and values[1].shape == (5, 2, 8)
    cart = Cartridge(keys, values)
    assert cart.nbytes() == 2 * 2 * 5 * 2 * 8 * 4  # keys+values x layers x P x heads x head_dim x float32
    full = model(input_ids=x).logits
    got = cartridge_forward(model, list(cart.keys), list(cart.values), x[:, 5:], torch.ones_like(x[:, 5:])).logits
    torch.testing.assert_close(got, full[:, 5:], atol=1e-5, rtol=1e-5)
    lm = CartridgeLM(model, Router("hidden"))
    lm.cartridges.append(cart)
    lm.set_experience(0)
    gen = lm.generate(input_ids=x[:, 5:], attention_mask=torch.ones_like(x[:, 5:]), max_new_tokens=3, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert gen[0, 7:].tolist() == ref[0, 12:].tolist()


def test_context_distillation_trains_the_cartridge_and_leaves_the_model_unchanged():
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = {n: p.clone() for n, p in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(3, 32, (6,), generator=g).tolist()
    samples = [(ctx, torch.randint(3, 32, (5,), generator=g).tolist()) for _ in range(3)]
    cart = Cartridge(*prefix_kv(model, torch.tensor([7, 8, 9])))
    opt = torch.optim.Adam(cart.parameters(), lr=5e-2)
    losses = []
    for _ in range(15):
        loss = distillation_loss(model, cart, samples, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(frozen[n], p) for n, p in model.state_dict().items())
    # with the context itself as the cartridge the KL is zero
    exact = Cartridge(*prefix_kv(model, torch.tensor(ctx)))
    assert distillation_loss(model, exact, samples, 0).item() < 1e-6


# --------------------------------------------------------------------------- end to end (shipped base)
TINY = """
name: tiny-15b
seed: 1
experiments:
  - name: domain
    stream: {kind: domain, experiences: 2, steps_per_experience: 2, batch_size: 2, seq_len: 32, test_docs: 2,
             eval_every: 0, general_tokens: 128}
    methods:
      - {name: titans, chunk: 8, key_dim: 16, hidden: 16}
      - {name: cartridges, prefix_tokens: 4, samples: 2, batch: 2, max_new_tokens: 4, chunk_tokens: 16}
  - name: facts
    stream: {kind: facts, experiences: 2, facts_per_experience: 1, steps_per_fact: 1, batch_size: 2, eval_every: 0}
    methods:
      - {name: rome, steps: 2, prompts: 2, cov_tokens: 512}
      - {name: memit, steps: 2, prompts: 2, cov_tokens: 512}
"""


@pytest.mark.e2e
def test_each_method_runs_on_tiny_streams_and_resumes(tmp_path, quick_runs, interrupt_run):
    from forgetless.experiments.runner import load_run_config, run

    p = tmp_path / "run.yaml"
    p.write_text(TINY)
    full = run(load_run_config(p), tmp_path / "full", progress=False, log=lambda s: None)
    for exp in ("domain", "facts"):
        for label, m in full[exp]["methods"].items():
            assert len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"]), label
    carts = full["domain"]["methods"]["cartridges"]["method"]["cartridge_bytes"]
    assert carts == [2 * 4 * 4 * 4 * 64 * 4] * 2  # keys+values x 4 layers x P=4 x 4 heads x 64 x float32
    assert full["facts"]["methods"]["rome"]["method"]["edits"] == 2
    import json

    # Ctrl-C right after each method saved its first experience; rerunning resumes it
    interrupt_run(lambda n, state_dir: len(json.loads((state_dir / "progress.json").read_text())["R"]) == 1)
    for _ in range(5):
        try:
            run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
            break
        except KeyboardInterrupt:
            pass
    interrupt_run(None)
    resumed = run(load_run_config(p), tmp_path / "resumed", progress=False, log=lambda s: None)
    for exp in ("domain", "facts"):
        for label in full[exp]["methods"]:
            assert resumed[exp]["methods"][label]["R"] == full[exp]["methods"][label]["R"], (exp, label)


@pytest.mark.e2e
def test_rome_and_memit_through_learn_report_easyedit_measures_and_touch_only_their_layers():
    import random

    from forgetless.data.factfile import load_fact_file
    from forgetless.data.facts import load_known_facts
    from forgetless.experiments.facts import FactEvaluator, StreamConfig, learn_facts
    from forgetless.models.folder import default_model_dir, load_heldout_ids, open_model
    from forgetless.training.lifecycle import MethodContext

    md = default_model_dir()
    facts = load_fact_file(md / "facts_new.jsonl")
    random.Random(0).shuffle(facts)
    facts = [f for f in facts if f.relation == "city_country"][:2]
    cfg = StreamConfig(eval_every=0, retained_sample=4, heldout_tokens=256, final_all_known=False)
    for name, layers in (("rome", [1]), ("memit", [0, 1])):
        model, tok = open_model(md)
        ctx = MethodContext.for_folder(md, tok)
        before = {n: p.clone() for n, p in model.state_dict().items()}
        ev = FactEvaluator(tok, load_known_facts(md)[:4], load_heldout_ids(md, tok, 256), cfg)
        method = make_method(name, steps=3, prompts=2, cov_tokens=512)
        model, res = learn_facts(model, tok, facts, method, ev, cfg, ctx, progress=False, log=lambda s: None)
        s = res.summary()
        assert set(s["easyedit"]) >= {"reliability", "generalization", "locality", "portability"}
        assert s["easyedit"]["portability_n"] == 2 and s["easyedit"]["generalization"] == s["learned"]
        changed = {n for n, p in model.state_dict().items() if not torch.equal(p, before[n])}
        assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in layers}, name
