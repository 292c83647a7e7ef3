"""Pretraining machinery on a small real corpus: checkpoints, resume, NaN handling, atomic writes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetless.errors import TrainingError
from forgetless.experiments.pretrain import load_pretrain_config, prepare_data, pretrain
from forgetless.models.checkpoint import atomic_folder, load_model
from forgetless.training.loop import (
    load_training_state,
    save_training_state,
    train_loop,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    cfg = load_pretrain_config(ROOT / "configs" / "smoke.yaml")
    data = prepare_data(cfg, tmp_path_factory.mktemp("data") / "data", log=lambda *a: None)
    return cfg, data


@pytest.mark.e2e
def test_data_split_is_recorded_and_clean(smoke):
    cfg, data = smoke
    split = json.loads((data / "data_split.json").read_text())
    assert set(split["heldout_topics"]) == set(cfg.data.heldout_topics)
    known = [json.loads(l) for l in (data / "facts_known.jsonl").read_text().splitlines()]
    new = [json.loads(l) for l in (data / "facts_new.jsonl").read_text().splitlines()]
    assert len(known) > 500 and len(new) > 500
    assert not {f["country"] for f in known} & {f["country"] for f in new}  # split by country
    lines = (data / "fact_lines.txt").read_text()
    new_statements = [s for f in new for s in [f["statement"], *f["paraphrases"]]]
    assert not any(s in lines for s in new_statements[:2000])  # new facts never in training lines
    assert "Tell me the" not in lines  # probe wording never trained


def _final_weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.e2e
def test_interrupted_pretraining_resumes_to_identical_weights(smoke, tmp_path, monkeypatch):
    cfg, data = smoke
    full = pretrain(cfg, tmp_path / "full", progress=False, log=lambda *a: None, data_dir=data)
    # Ctrl-C right after the checkpoint of step 10 (of 20), then the same command again
    import forgetless.experiments.pretrain as pt
    original = pt.save_training_state

    def save_then_interrupt(out_dir, model, optimizers, step, **kw):
        original(out_dir, model, optimizers, step, **kw)
        if step == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(pt, "save_training_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "resumed", progress=False, log=lambda *a: None, data_dir=data)
    monkeypatch.setattr(pt, "save_training_state", original)
    assert not (tmp_path / "resumed" / "model").exists()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 10
    resumed = pretrain(cfg, tmp_path / "resumed", progress=False, log=lambda *a: None, data_dir=data)
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ev = json.loads((resumed / "evaluation.json").read_text())
    assert [h["step"] for h in ev["history"]] == [10, 20]
    assert ev["memory_health"]["background_batches"] == cfg.background.batches
    assert (resumed / "memory_stats.safetensors").is_file() and (resumed / "README.md").is_file()
    model = load_model(resumed)
    assert sum(p.numel() for p in model.parameters()) == ev["parameters"]


def _tiny_setup():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    model, opt = _tiny_setup()
    ckpt = tmp_path / "ckpt"

    def loss_fn(m, batch):
        step, x = batch
        loss = m(input_ids=x, labels=x).loss
        return loss * float("nan") if step == 3 else loss

    x = torch.randint(0, 32, (2, 8))
    with pytest.raises(TrainingError, match="step 3"):
        train_loop(model, [opt], lambda s: (s, x), loss_fn, steps=6, progress=False,
                   on_checkpoint=lambda s: save_training_state(ckpt, model, [opt], s), checkpoint_every=1)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3  # steps 0..2 done and saved; nothing of the failed step written
    fresh, fresh_opt = _tiny_setup()
    load_training_state(ckpt, fresh, [fresh_opt])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_atomic_folder_leaves_old_version_on_failure(tmp_path):
    dest = tmp_path / "model"
    atomic_folder(dest, lambda d: (d / "a.txt").write_text("v1"))

    def broken(d):
        (d / "a.txt").write_text("v2-partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(dest, broken)
    assert (dest / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


@pytest.mark.e2e
@pytest.mark.parametrize("steps,slow_level_moved", [(3, False), (4, True)])
def test_pretraining_a_base_with_a_continuum_memory_block_steps_its_slow_level_on_its_period(
        smoke, tmp_path, steps, slow_level_moved):
    _, data = smoke  # same data section as smoke.yaml
    cfg = load_pretrain_config(ROOT / "configs" / "smoke-cms.yaml")
    cfg.train.steps, cfg.train.eval_every, cfg.train.checkpoint_every = steps, steps, steps
    out = pretrain(cfg, tmp_path / "cms", progress=False, log=lambda *a: None, data_dir=data)
    model = load_model(out)  # rebuilt with its CMS block from config.json
    block = model.model.layers[0].mlp
    assert list(block.periods) == [1, 4]
    slow = block.levels[1]
    # the slow level's down projection starts at exactly zero and moves only at step 4
    assert bool((slow.down_proj.weight != 0).any()) == slow_level_moved


def test_the_two_memory_recipe_loads_and_fits_the_shipped_size():
    # issue 12's re-pretraining recipe: two memory layers whose bf16 values take the shipped layer's room
    cfg = load_pretrain_config(ROOT / "configs" / "forgetless-tiny-2mem.yaml")
    shipped = load_pretrain_config(ROOT / "configs" / "forgetless-tiny.yaml")
    assert cfg.memory.layers == [1, 3] and cfg.memory.n_keys**2 == 65_536

    def values(c):  # v_dim unset: the hidden size
        return len(c.memory.layers) * c.memory.n_keys**2 * (c.memory.v_dim or c.model.hidden_size)

    assert cfg.memory.v_dim == 128 and values(cfg) == values(shipped)
    assert values(cfg) * 2 < 60e6  # bf16 value tables under the 60 MB the repository allows for weights


@pytest.mark.e2e
def test_a_base_with_two_memory_layers_pretrains_and_smf_trains_selected_rows_of_both(smoke, tmp_path):
    import copy

    from forgetless.data.facts import load_known_facts, read_builtin_facts
    from forgetless.evaluate.facts import FactEvaluator
    from forgetless.experiments.facts import learn_facts
    from forgetless.experiments.streams import StreamConfig
    from forgetless.methods import make_method
    from forgetless.models.folder import load_heldout_ids, open_model
    from forgetless.models.memory import named_memory_layers
    from forgetless.training import MethodContext

    cfg, data = smoke
    cfg = copy.deepcopy(cfg)
    cfg.memory.layers = [0, 1]
    model_dir = pretrain(cfg, tmp_path / "two", progress=False, log=lambda *a: None, data_dir=data)
    model, tok = open_model(model_dir)
    names = list(named_memory_layers(model))
    assert len(names) == 2
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ctx = MethodContext.for_folder(model_dir, tok)
    facts = read_builtin_facts(model_dir / "facts_new.jsonl")[:2]
    stream = StreamConfig(kind="facts", batch_size=4, steps_per_fact=2, eval_every=0, retained_sample=5,
                          heldout_tokens=256)
    ev = FactEvaluator(tok, load_known_facts(model_dir)[:5], load_heldout_ids(model_dir, tok, 256), stream)
    method = make_method("smf", lr=50.0, top_t=8, protect=0.0)
    selected: dict[str, set[int]] = {n: set() for n in names}
    orig = method.after_backward

    def record(m, step):
        orig(m, step)
        for n, rows in method.last_selected.items():
            selected[n].update(rows.tolist())

    method.after_backward = record
    model, res = learn_facts(model, tok, facts, method, ev, stream, ctx, progress=False, log=lambda s: None)
    after = model.state_dict()
    for k, v in before.items():
        if k.removesuffix(".values") in names:
            continue
        assert torch.equal(v, after[k]), f"{k} changed"
    for n in names:
        changed = (after[f"{n}.values"] != before[f"{n}.values"]).any(dim=1).nonzero().flatten().tolist()
        assert changed and set(changed) <= selected[n], n  # each layer: only its own selected rows
        assert len(selected[n]) <= 8 * stream.steps_per_fact * len(facts)
    v_dim = after[f"{names[0]}.values"].shape[1]
    assert res.trainable_params_per_step == 2 * 8 * v_dim
