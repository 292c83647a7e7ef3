"""Fixtures shared by the tests."""

import pytest


@pytest.fixture(autouse=True)
def fp32_training(monkeypatch):
    """Every test trains in fp32 unless it sets ``FORGETLESS_PRECISION`` itself: on a CPU with AMX
    (and on a bf16 GPU) the engine would otherwise choose bf16 autocast, and the tests that compare
    an update with one computed by hand in fp32, or a learning figure measured in fp32, would
    depend on the machine CI happens to run on. Precision choice has its own tests."""
    monkeypatch.setenv("FORGETLESS_PRECISION", "fp32")


@pytest.fixture
def interrupt_run(monkeypatch):
    """``interrupt_run(when)``: from now on `forgetless.run` raises KeyboardInterrupt (Ctrl-C) right
    after the n-th saved experience state (n counted from 1) for which ``when(n, state_dir)`` is
    true; ``interrupt_run(None)`` restores plain saving."""
    import forgetless.experiments.runner as run_mod

    original = run_mod._save_state

    def arm(when):
        if when is None:
            monkeypatch.setattr(run_mod, "_save_state", original)
            return
        calls = {"n": 0}

        def save_then_stop(state_dir, model, rec, method=None):
            original(state_dir, model, rec, method)
            calls["n"] += 1
            if when(calls["n"], state_dir):
                raise KeyboardInterrupt

        monkeypatch.setattr(run_mod, "_save_state", save_then_stop)

    return arm


@pytest.fixture
def quick_runs(monkeypatch):
    """Shorter end-to-end runs: the fact stream probes 4 of the base's known facts (not 100), held-out
    text is at most 1,024 tokens (the fact stream's default scores 16,384, and 65,536 at its start and
    end: most of a tiny run's time), and no report or comparison page is drawn."""
    import forgetless.experiments.runner as runner_mod
    import forgetless.experiments.streams as streams_mod

    read = streams_mod.load_known_facts
    monkeypatch.setattr(streams_mod, "load_known_facts", lambda model_dir: read(model_dir)[:4])
    heldout = streams_mod.load_heldout_ids
    monkeypatch.setattr(streams_mod, "load_heldout_ids", lambda model_dir, tok, n: heldout(model_dir, tok, min(n, 1024)))
    monkeypatch.setattr(runner_mod, "write_run_report", lambda results, out: None)
    monkeypatch.setattr(runner_mod, "compare_runs", lambda results, out: None)
