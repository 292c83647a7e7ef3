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
