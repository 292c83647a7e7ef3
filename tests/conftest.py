"""Fixtures shared by the end-to-end `forgetless run` tests."""

import pytest


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
    """Shorter end-to-end runs: the fact stream probes 4 of the base's known facts (not 100), and no
    report or comparison page is drawn."""
    import forgetless.experiments.streams as streams_mod
    import forgetless.report.runs as report_mod

    read = streams_mod.load_known_facts
    monkeypatch.setattr(streams_mod, "load_known_facts", lambda model_dir: read(model_dir)[:4])
    monkeypatch.setattr(report_mod, "write_run_report", lambda results, out: None)
    monkeypatch.setattr(report_mod, "compare_runs", lambda results, out: None)
