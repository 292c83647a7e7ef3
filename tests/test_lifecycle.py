"""The one lifecycle (training.lifecycle.fit_experience): hook order, context and plugins.

A recording method and a recording plugin log every hook; every caller (run, learn, bench facts)
goes through fit_experience, so the order asserted here is what every method sees."""

import torch
from helpers import tiny_llama

from forgetless.methods import Plugin, make_method
from forgetless.methods.full import FullFinetune
from forgetless.training import (
    Experience,
    MethodContext,
    fit_experience,
    load_method_state,
    method_state,
)


def tiny():
    return tiny_llama(positions=16)


def batch(step):
    x = torch.randint(3, 32, (2, 6), generator=torch.Generator().manual_seed(step))
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


class Recording(FullFinetune):
    name = "recording"

    def __init__(self, log, **kw):
        super().__init__(**kw)
        self.log = log

    def setup(self, model, context):
        self.log.append(("setup", context.experience.name, context.experience_index,
                         [e.name for e in context.seen_experiences]))
        return super().setup(model, context)

    def before_batch(self, model, batch, step):
        self.log.append(("before_batch", step))
        return batch

    def loss(self, model, batch):
        self.log.append(("loss",))
        return super().loss(model, batch)

    def after_backward(self, model, step):
        self.log.append(("after_backward", step, all(p.grad is not None for p in model.parameters())))

    def after_step(self, model, step):
        self.log.append(("after_step", step))

    def export(self, model):
        self.log.append(("export", model.training))
        return model

    def after_experience(self, model, experience):
        self.log.append(("after_experience", experience.name, model.training))


class RecordingPlugin(Plugin):
    name = "rec"

    def __init__(self, log):
        self.log, self.seen = log, 0

    def setup(self, model, context, method):
        self.log.append(("plugin.setup", method.name))

    def before_batch(self, model, batch, step):
        self.log.append(("plugin.before_batch", step))

    def after_backward(self, model, step):
        self.log.append(("plugin.after_backward", step))

    def after_step(self, model, step):
        self.seen += 1
        self.log.append(("plugin.after_step", step))

    def teardown(self):
        self.log.append(("plugin.teardown",))

    def after_experience(self, model, experience):
        self.log.append(("plugin.after_experience", experience.name))

    def state_tensors(self):
        return {"seen": torch.tensor([self.seen])}

    def load_state_tensors(self, state):
        self.seen = int(state["seen"][0])


def test_hooks_run_in_the_documented_order_with_the_context_filled():
    log = []
    method = Recording(log, lr=1e-3)
    method.plugins = [RecordingPlugin(log)]
    exps = [Experience("a", batch, 2), Experience("b", batch, 1)]
    ctx = MethodContext()
    model = fit_experience(method, tiny(), ctx, exps[0], 0, exps[:1], progress=False).model
    fit = fit_experience(method, model, ctx, exps[1], 1, exps, progress=False)
    step = lambda s: [("before_batch", s), ("plugin.before_batch", s), ("loss",), ("after_backward", s, True),  # noqa: E731
                      ("plugin.after_backward", s), ("after_step", s), ("plugin.after_step", s)]
    end = lambda name: [("plugin.teardown",), ("export", True), ("after_experience", name, False),  # noqa: E731
                        ("plugin.after_experience", name)]
    assert log == ([("setup", "a", 0, ["a"]), ("plugin.setup", "recording"), *step(0), *step(1), *end("a"),
                    ("setup", "b", 1, ["a", "b"]), ("plugin.setup", "recording"), *step(0), *end("b")])
    assert ctx.experience is exps[1] and ctx.experience_index == 1
    assert fit.steps == 1 and fit.trainable_params == sum(p.numel() for p in model.parameters())


def test_plugin_state_is_namespaced_and_round_trips():
    method = make_method("full", lr=1e-3, continual_backprop={"rate": 0.1, "maturity": 0})
    method.plugins.append(RecordingPlugin([]))
    fit_experience(method, tiny(), MethodContext(), Experience("a", batch, 3), progress=False)
    state = method_state(method)
    assert state["plugins.rec.seen"].tolist() == [3]
    assert any(k.startswith("plugins.continual_backprop.utility.") for k in state)
    other = make_method("full", lr=1e-3, continual_backprop={"rate": 0.1, "maturity": 0})
    other.plugins.append(RecordingPlugin([]))
    load_method_state(other, state)
    assert other.plugins[1].seen == 3 and other.plugins[0].replaced == method.plugins[0].replaced > 0


def test_teardown_runs_when_training_fails():
    log = []
    method = Recording(log, lr=1e-3)
    method.plugins = [RecordingPlugin(log)]

    def bad(step):
        raise RuntimeError("no batch")

    try:
        fit_experience(method, tiny(), MethodContext(), Experience("a", bad, 2), progress=False)
    except RuntimeError:
        pass
    assert log[-1] == ("plugin.teardown",) and ("export", True) not in log


def test_a_method_that_does_not_train_skips_the_loop():
    log = []
    method = Recording(log, lr=1e-3)
    method.trains = False
    fit = fit_experience(method, tiny(), MethodContext(), Experience("a", batch, 5), progress=False)
    assert [e[0] for e in log] == ["setup", "export", "after_experience"] and fit.steps == 0


def test_batches_follow_the_model_to_its_device():
    from forgetless.training.lifecycle import on_device, to_device

    meta, cpu = torch.device("meta"), torch.device("cpu")
    b = {"input_ids": torch.ones(2, 3, dtype=torch.long), "more": [torch.zeros(1), (torch.ones(1),)], "n": 3}
    moved = to_device(b, meta)
    assert moved["input_ids"].device == meta and moved["input_ids"].shape == (2, 3)
    assert moved["more"][0].device == meta and moved["more"][1][0].device == meta and isinstance(moved["more"][1], tuple)
    assert moved["n"] == 3 and to_device(b, cpu)["input_ids"] is b["input_ids"]  # already there: not copied
    exp = Experience("e", batch, 2, test="t", valid_batch=batch)
    there = on_device(exp, meta)
    assert there.train_batch(1)["input_ids"].device == meta and there.valid_batch(0)["labels"].device == meta
    assert (there.name, there.steps, there.test) == ("e", 2, "t") and exp.train_batch(1)["input_ids"].device == cpu
    assert on_device(Experience("e", batch, 1), meta).valid_batch is None


def test_bf16_autocast_is_chosen_by_the_device_unless_given(monkeypatch):
    import forgetless.training.lifecycle as lifecycle

    seen = []
    real = lifecycle.train_loop
    monkeypatch.setattr(lifecycle, "train_loop", lambda *a, **kw: seen.append(kw["bf16"]) or real(*a, **kw))
    for native, given in ((None, None), (torch.bfloat16, None), (torch.bfloat16, False), (None, True)):
        monkeypatch.setattr(lifecycle, "autocast_dtype", lambda device, native=native: native)
        fit_experience(make_method("full", lr=1e-3), tiny(), MethodContext(), Experience("e", batch, 1),
                       progress=False, bf16=given)
    assert seen == [False, True, False, True]


# --------------------------------------------------------------------------- the loss on scored positions only
def _padded_batch(answer_only: bool):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(3, 32, (3, 7), generator=g)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0  # right padding
    mask[2, 3:] = 0
    labels = x.masked_fill(mask == 0, -100)
    if answer_only:
        labels[:, :4] = -100
    return {"input_ids": x, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, b, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lm_loss_scores_only_labelled_positions_with_the_full_logits_loss_and_gradients():
    """lm_loss_masked runs the LM head on the positions that predict a label only (padding, the
    last position and, for answer-only labels, the prompt are left out) and gives the loss and
    gradients of the full-logits shifted cross-entropy."""
    from forgetless.training.losses import lm_loss_masked, shifted_cross_entropy

    def full_logits(m, b):
        return shifted_cross_entropy(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    for answer_only in (False, True):
        model = tiny_llama(positions=16)
        b = _padded_batch(answer_only)
        rows = []
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape[:-1]))
        fast, g_fast = _loss_and_grads(model, b, lm_loss_masked)
        assert rows[-1] == (1, int((b["labels"][:, 1:] != -100).sum()))  # scored positions only
        ref, g_ref = _loss_and_grads(model, b, full_logits)
        assert rows[-1] == (3, 7)
        assert torch.allclose(fast, ref, atol=1e-6) and g_fast.keys() == g_ref.keys()
        for n in g_ref:
            assert torch.allclose(g_fast[n], g_ref[n], atol=1e-6), n


def test_lm_loss_on_a_peft_model_and_on_a_callable_without_an_lm_head():
    from peft import LoraConfig, get_peft_model
    from torch.func import functional_call

    from forgetless.training.losses import lm_loss_masked, shifted_cross_entropy

    b = _padded_batch(False)
    model = tiny_llama(positions=16)
    ref = shifted_cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert torch.allclose(lm_loss_masked(peft, b), ref, atol=1e-6)  # LoRA B starts at zero: the same model
    params = dict(model.named_parameters())
    plain = lambda *a, **k: functional_call(model, params, a, k)  # noqa: E731 (no get_output_embeddings)
    assert torch.allclose(lm_loss_masked(plain, b), ref, atol=1e-6)
