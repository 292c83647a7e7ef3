"""Pretraining of the tiny base: corpus -> tokenizer -> Llama + product-key memory -> model folder.

``pretrain(config, out_dir)`` writes into ``out_dir``:

- ``data/``        tokenizer, token streams, fact lists and the exact data split (built once, reused)
- ``checkpoint/``  the latest training state (atomic; a rerun resumes from it)
- ``log.jsonl``    loss, held-out NLL and probe accuracy at every evaluation
- ``model/``       the finished base: weights, tokenizer, background slot statistics, fact
                   lists, probe templates, data split, model card
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import load_config, to_dict
from ..data.corpus import Corpus, DataConfig, build_corpus
from ..data.facts import (
    PROBES,
    QUESTIONS,
    STATEMENTS,
    Fact,
    probe_prompts,
    read_builtin_facts,
    write_facts,
)
from ..errors import ConfigError, DataSourceError
from ..evaluate.answers import exact_match, greedy_answers, heldout_nll, score_answers
from ..evaluate.slots import collect_background
from ..models.base import MemorySection, ModelConfig, build_base
from ..models.checkpoint import MIX_PREFIX, atomic_folder, save_model, write_json
from ..models.cms import LevelSchedule, cms_named_levels
from ..models.memory import memory_layers, memory_parameter_groups
from ..models.precision import autocast_dtype
from ..models.tokenizer import EOS, load_tokenizer, train_tokenizer
from ..report.modelcard import memory_health, write_model_card
from ..training.loop import load_training_state, save_training_state, train_loop
from ..training.optim import LazyAdam, adamw


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    values_lr: float = 1e-3  # SparseAdam on the memory value table (its own group, like the paper)
    keys_lr: float | None = None  # memory sub-keys and query projection (None = lr)
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast where the hardware computes bf16 natively (models/precision.py)
    device: str = "auto"
    eval_every: int = 500
    checkpoint_every: int = 500
    probe_sample: int = 200  # known and new facts probed at each evaluation (all at the end)


@dataclass
class BackgroundConfig:
    batches: int = 1000
    batch_size: int = 8
    seq_len: int = 128  # one sequence is one IDF document


@dataclass
class PretrainConfig:
    name: str = "forgetless-tiny"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemorySection = field(default_factory=MemorySection)
    train: TrainConfig = field(default_factory=TrainConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    values_dtype: str = "bfloat16"  # storage dtype of memory values in the finished model

    def __post_init__(self) -> None:
        if self.values_dtype not in ("float32", "bfloat16"):
            raise ConfigError("values_dtype must be 'float32' or 'bfloat16'.")
        if not 0 <= self.data.fact_share < 1:
            raise ConfigError("data.fact_share must be in [0, 1).")
        if self.train.steps < 1 or self.train.batch_size < 1:
            raise ConfigError("train.steps and train.batch_size must be positive.")


def load_pretrain_config(path: str | os.PathLike) -> PretrainConfig:
    cfg = load_config(PretrainConfig, path)
    cfg.memory.placement()  # validates the memory options
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- data
def _data_key(cfg: PretrainConfig) -> str:
    blob = json.dumps({"data": to_dict(cfg.data), "tok": to_dict(cfg.tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode_stream(tok, texts: list[str], sep: int, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts joined by ``sep``; returns (ids, start offset of each text)."""
    ids: list[np.ndarray] = []
    starts, pos = [], 0
    for i in range(0, len(texts), batch):
        for enc in tok(texts[i:i + batch], add_special_tokens=False)["input_ids"]:
            arr = np.asarray(enc + [sep], dtype=np.uint16)
            starts.append(pos)
            pos += arr.size
            ids.append(arr)
    return (np.concatenate(ids) if ids else np.zeros(0, np.uint16)), np.asarray(starts, dtype=np.int64)


def prepare_data(cfg: PretrainConfig, data_dir: Path, log=print) -> Path:
    """Build corpus, tokenizer and token streams once (reused when the data config is unchanged)."""
    key = _data_key(cfg)
    stamp = data_dir / "DATA_KEY"
    if stamp.is_file() and stamp.read_text().strip() == key:
        return data_dir

    def write(tmp: Path) -> None:
        t0 = time.time()
        corpus: Corpus = build_corpus(cfg.data)
        log(f"corpus: {len(corpus.train):,} training documents, {len(corpus.heldout):,} held out, "
            f"{len(corpus.fact_lines):,} fact lines ({time.time() - t0:.0f}s)")
        rng = random.Random(cfg.seed)
        tok_texts = corpus.train + corpus.fact_lines
        tok = train_tokenizer((tok_texts[i] for i in rng.sample(range(len(tok_texts)), len(tok_texts))),
                              vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency)
        tok.save_pretrained(tmp)
        eos = tok.convert_tokens_to_ids(EOS)
        nl = tok("\n", add_special_tokens=False)["input_ids"]
        general, _ = _encode_stream(tok, corpus.train, eos)
        held, _ = _encode_stream(tok, corpus.heldout, eos)
        lines = corpus.fact_lines[:]
        rng.shuffle(lines)
        facts_ids, fact_starts = _encode_stream(tok, lines, nl[-1])
        np.save(tmp / "train_general.npy", general)
        np.save(tmp / "heldout.npy", held)
        np.save(tmp / "fact_lines.npy", facts_ids)
        np.save(tmp / "fact_line_starts.npy", fact_starts)
        write_facts(tmp / "facts_known.jsonl", corpus.known)
        write_facts(tmp / "facts_new.jsonl", corpus.new)
        (tmp / "heldout_domains.jsonl").write_text(
            "".join(json.dumps({"topic": t, **s}) + "\n" for t, v in corpus.domains.items() for s in v))
        (tmp / "fact_lines.txt").write_text("\n".join(corpus.fact_lines) + "\n")
        (tmp / "heldout_text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.heldout))
        info = dict(corpus.info)
        info["qa_trained_fact_ids"] = corpus.qa_ids
        info["tokens"] = {"train_general": int(general.size), "heldout": int(held.size),
                          "fact_lines": int(facts_ids.size)}
        info["chars_per_token"] = sum(map(len, corpus.train[:2000])) / max(
            1, sum(len(x) for x in tok(corpus.train[:2000], add_special_tokens=False)["input_ids"]))
        info["seconds"] = time.time() - t0
        write_json(tmp / "data_split.json", info)
        (tmp / "DATA_KEY").write_text(key)
        log(f"tokens: general {general.size:,}, held-out {held.size:,}, fact lines {facts_ids.size:,}")

    return atomic_folder(data_dir, write)


class BatchSampler:
    """Deterministic batches: batch ``step`` depends only on (seed, step)."""

    def __init__(self, data_dir: Path, seq_len: int, batch_size: int, fact_share: float, seed: int):
        self.general = torch.from_numpy(np.load(data_dir / "train_general.npy").astype(np.int64))
        self.facts = torch.from_numpy(np.load(data_dir / "fact_lines.npy").astype(np.int64))
        self.fact_starts = torch.from_numpy(np.load(data_dir / "fact_line_starts.npy"))
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.n_fact = round(batch_size * fact_share) if self.facts.numel() > seq_len + 1 else 0
        if self.general.numel() <= seq_len + 1:
            raise DataSourceError("the general training text is shorter than one sequence.")

    def _windows(self, stream: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        ar = torch.arange(self.seq_len + 1)
        return stream[starts[:, None] + ar[None, :]]

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n_gen = self.batch_size - self.n_fact
        gs = torch.randint(0, self.general.numel() - self.seq_len - 1, (n_gen,), generator=g)
        rows = [self._windows(self.general, gs)]
        if self.n_fact:
            valid = self.fact_starts[self.fact_starts < self.facts.numel() - self.seq_len - 1]
            fs = valid[torch.randint(0, valid.numel(), (self.n_fact,), generator=g)]
            rows.append(self._windows(self.facts, fs))
        return torch.cat(rows)


def background_batches(data_dir: Path, bg: BackgroundConfig, seed: int):
    """Batches of the general pretraining text (no fact lines) for background slot statistics."""
    stream = torch.from_numpy(np.load(data_dir / "train_general.npy").astype(np.int64))
    g = torch.Generator().manual_seed(seed + 777)
    ar = torch.arange(bg.seq_len)
    for _ in range(bg.batches):
        starts = torch.randint(0, stream.numel() - bg.seq_len, (bg.batch_size,), generator=g)
        yield stream[starts[:, None] + ar[None, :]]


def pretrain_mix_batches(data_dir: Path, bg: BackgroundConfig, fact_share: float, seed: int):
    """Batches of the full pretraining mixture (general text *and* fact lines, in the training ratio)."""
    sampler = BatchSampler(data_dir, bg.seq_len - 1, bg.batch_size, fact_share, seed + 991)
    for i in range(bg.batches):
        yield sampler(i)


def collect_all_background(model: nn.Module, data_dir: Path, cfg: "PretrainConfig", progress: bool = True) -> dict:
    """Slot statistics over general pretraining text (memory health) and, under ``pretrain_mix.``,
    over the full pretraining mixture with its fact lines (the IDF background of sparse memory finetuning)."""

    stats = collect_background(model, background_batches(data_dir, cfg.background, cfg.seed), progress=progress)
    mix = collect_background(model, pretrain_mix_batches(data_dir, cfg.background, cfg.data.fact_share, cfg.seed),
                             progress=progress)
    stats.update({MIX_PREFIX + k: v for k, v in mix.items()})
    return stats


# --------------------------------------------------------------------------- model + optimizers
def make_optimizers(model: nn.Module, t: TrainConfig) -> list[torch.optim.Optimizer]:
    groups = memory_parameter_groups(model)
    decay = [p for p in groups["other"] if p.dim() >= 2]
    no_decay = [p for p in groups["other"] if p.dim() < 2]
    opt_groups = [{"params": decay, "weight_decay": t.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    if groups["keys"]:
        opt_groups.append({"params": groups["keys"], "weight_decay": 0.0, "lr": t.keys_lr or t.lr})
    opts: list[torch.optim.Optimizer] = [adamw(opt_groups, lr=t.lr, betas=(t.beta1, t.beta2))]
    if groups["values"]:
        sparse = [p for p in groups["values"]]
        if any(m.config.sparse_values for m in memory_layers(model)):
            opts.append(LazyAdam(sparse, lr=t.values_lr, betas=(t.beta1, t.beta2)))
        else:
            opts.append(adamw(sparse, lr=t.values_lr, betas=(t.beta1, t.beta2), weight_decay=0.0))
    return opts


def make_schedulers(opts: list[torch.optim.Optimizer], t: TrainConfig) -> list:
    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        prog = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))

    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in opts]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


# --------------------------------------------------------------------------- evaluation
def probe_facts(model: nn.Module, tok, facts: list[Fact], kinds=("question", "cloze")) -> dict:
    """Greedy answers to the held-out probes of built-in facts: EM/F1 per probe kind and relation."""
    out: dict[str, dict] = {}
    for kind in kinds:
        prompts = [probe_prompts(f)[kind] for f in facts]
        preds = greedy_answers(model, tok, prompts)
        golds = [f.answer for f in facts]
        res = score_answers(preds, golds)
        res["by_relation"] = {}
        for rel in sorted({f.relation for f in facts}):
            sel = [i for i, f in enumerate(facts) if f.relation == rel]
            res["by_relation"][rel] = score_answers([preds[i] for i in sel], [golds[i] for i in sel])["exact_match"]
        res["examples"] = [{"prompt": prompts[i], "pred": preds[i], "gold": golds[i]} for i in range(min(5, len(facts)))]
        res["correct_ids"] = [f.id for f, p, g in zip(facts, preds, golds) if exact_match(p, g)]
        out[kind] = res
    # the question probe is the primary score; the cloze is a harder, secondary generalisation test
    out["exact_match"] = out[kinds[0]]["exact_match"]
    out["mean_over_kinds"] = sum(out[k]["exact_match"] for k in kinds) / len(kinds)
    return out


def subset_em(res: dict, ids: set[str], kind: str = "question") -> float:
    """Exact match of one probe kind of a ``probe_facts`` result over the facts with the given ids."""
    if not ids:
        return float("nan")
    return len(ids & set(res[kind]["correct_ids"])) / len(ids)


def _sample(facts: list[Fact], n: int, seed: int) -> list[Fact]:
    return facts if len(facts) <= n else random.Random(seed).sample(facts, n)


# --------------------------------------------------------------------------- main entry
def pretrain(cfg: PretrainConfig, out_dir: str | os.PathLike, resume: bool = True, progress: bool = True,
             log=print, data_dir: str | os.PathLike | None = None) -> Path:
    """Pretrain and write ``out_dir/model``. ``data_dir`` may point to a shared data folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    data_dir = prepare_data(cfg, Path(data_dir) if data_dir else out / "data", log=log)
    tok = load_tokenizer(data_dir)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    model = build_base(cfg.model, cfg.memory, vocab_size=len(tok), eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id).to(device)
    opts = make_optimizers(model, cfg.train)
    scheds = make_schedulers(opts, cfg.train)
    ckpt = out / "checkpoint"
    start, state_extra = 0, {}
    if resume and ckpt.is_dir():
        state = load_training_state(ckpt, model, opts, scheds)
        start, state_extra = state["step"], state.get("extra", {})
        model.to(device)
        log(f"resuming from step {start} ({ckpt})")
    elif ckpt.is_dir():
        shutil.rmtree(ckpt)
    t = cfg.train
    sampler = BatchSampler(data_dir, t.seq_len, t.batch_size, cfg.data.fact_share, cfg.seed)
    held = torch.from_numpy(np.load(data_dir / "heldout.npy").astype(np.int64))
    known = read_builtin_facts(data_dir / "facts_known.jsonl")
    new = read_builtin_facts(data_dir / "facts_new.jsonl")
    # (seeds differ from the corpus' choice of QA-trained facts, which uses split_seed + 1)
    known_s, new_s = _sample(known, t.probe_sample, 1001), _sample(new, t.probe_sample, 1002)
    log_path = out / "log.jsonl"
    history = [json.loads(l) for l in log_path.read_text().splitlines()] if (resume and log_path.is_file()) else []
    history = [h for h in history if h["step"] <= start]
    train_seconds = float(state_extra.get("train_seconds", 0.0))
    t_start = time.time()
    losses: list[float] = []

    def after_step(step: int, loss: float) -> None:
        losses.append(loss)

    def on_eval(step: int) -> None:
        nll = heldout_nll(model, held, seq_len=t.seq_len, max_tokens=65_536)
        pk, pn = probe_facts(model, tok, known_s), probe_facts(model, tok, new_s)
        rec = {"step": step, "tokens": step * t.batch_size * t.seq_len,
               "train_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1), "heldout_nll": nll["nll"],
               "heldout_ppl": nll["ppl"], "known_probe_em": pk["exact_match"], "new_probe_em": pn["exact_match"],
               "known_question_em": pk["question"]["exact_match"], "known_cloze_em": pk["cloze"]["exact_match"],
               "new_question_em": pn["question"]["exact_match"], "new_cloze_em": pn["cloze"]["exact_match"],
               "seconds": train_seconds + time.time() - t_start}
        history.append(rec)
        log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        log(f"step {step}: loss {rec['train_loss']:.3f}, held-out ppl {nll['ppl']:.1f}, "
            f"known probes {pk['exact_match']:.1%}, new probes {pn['exact_match']:.1%}")

    def on_checkpoint(step: int) -> None:
        save_training_state(ckpt, model, opts, step, schedulers=scheds,
                            extra={"train_seconds": train_seconds + time.time() - t_start})

    schedule = _cms_schedule(model, start, log)
    if start < t.steps:
        log(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {device} "
            f"for {t.steps - start} steps of {t.batch_size}x{t.seq_len} tokens")
        train_loop(model, opts, lambda s: sampler(s).to(device), lm_loss, t.steps, start_step=start,
                   schedulers=scheds, grad_clip=t.grad_clip, bf16=t.bf16 and autocast_dtype(device) is not None,
                   after_step=after_step, after_backward=schedule, on_eval=on_eval, eval_every=t.eval_every, on_checkpoint=on_checkpoint,
                   checkpoint_every=t.checkpoint_every, progress=progress, desc="pretraining",
                   tokens_per_batch=lambda b: b[:, :-1].numel())
    train_seconds += time.time() - t_start
    return finalize(cfg, model, tok, data_dir, out, history, train_seconds, device, progress=progress, log=log)


def _cms_schedule(model: nn.Module, start: int, log=print):
    """For a base with continuum-memory blocks (``model.cms``): the levels' update rule during
    pretraining (level l steps every C_l steps with its mean accumulated gradient; see
    ``methods/cms.py``). On resume the step counter continues; gradients pending in an
    interrupted chunk are not saved, so that chunk restarts."""

    levels = cms_named_levels(model)
    if not levels:
        return None
    schedule = LevelSchedule(levels, step=start)
    log(f"continuum memory: {len(levels)} levels with periods {sorted({c for c, _ in levels})}")
    return lambda step: schedule.after_backward()


def evaluate_base(model: nn.Module, tok, data_dir: Path, stats: dict, seq_len: int) -> dict:
    """Held-out perplexity, probe accuracy on known and new facts, and memory health."""

    known = read_builtin_facts(data_dir / "facts_known.jsonl")
    new = read_builtin_facts(data_dir / "facts_new.jsonl")
    split = json.loads((data_dir / "data_split.json").read_text())
    qa_ids = set(split.get("qa_trained_fact_ids", []))
    held = torch.from_numpy(np.load(data_dir / "heldout.npy").astype(np.int64))
    nll = heldout_nll(model, held, seq_len=seq_len)
    pk, pn = probe_facts(model, tok, known), probe_facts(model, tok, new)
    known_ids = {f.id for f in known}
    return {
        "heldout": nll, "known_probes": pk, "new_probes": pn,
        "known_probes_qa_trained": subset_em(pk, known_ids & qa_ids),
        "known_probes_statement_only": subset_em(pk, known_ids - qa_ids),
        "memory_health": memory_health(model, tok, stats, known + new),
        "parameters": sum(p.numel() for p in model.parameters()),
        "memory_values": sum(m.values.numel() for m in memory_layers(model)),
        "vocab_size": len(tok),
    }


def finalize(cfg: PretrainConfig, model: nn.Module, tok, data_dir: Path, out: Path, history: list[dict],
             train_seconds: float, device: torch.device, progress: bool = True, log=print) -> Path:
    """Background statistics, final evaluation, model card; writes ``out/model`` atomically.

    With ``values_dtype: bfloat16`` the memory values are rounded to bf16 *before* the
    evaluation, so the figures describe exactly the weights that are saved."""

    model.eval()
    dtype = torch.bfloat16 if cfg.values_dtype == "bfloat16" else None
    if dtype is not None:
        with torch.no_grad():
            for m in memory_layers(model):
                m.values.copy_(m.values.to(dtype).float())
    # the final phase is checkpointed too (out/final): a rerun after an interruption reuses what is done
    final = out / "final"
    stats_file, eval_file = final / "memory_stats.safetensors", final / "evaluation.json"
    state = out / "checkpoint" / "trainer_state.json"  # the finished training's last checkpoint
    key = {"config": hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest(),
           "checkpoint": hashlib.sha256(state.read_bytes()).hexdigest() if state.is_file() else None}
    key_file = final / "key.json"
    if final.is_dir() and (not key_file.is_file() or json.loads(key_file.read_text()) != key):
        shutil.rmtree(final)  # from another config or another training: not reused
    final.mkdir(parents=True, exist_ok=True)
    write_json(key_file, key)
    if stats_file.is_file():
        stats = load_file(str(stats_file))
        log(f"reusing the background statistics in {stats_file}")
    else:
        stats = collect_all_background(model, data_dir, cfg, progress=progress)
        tmp = final / ".memory_stats.tmp"
        save_file({k: v.contiguous().cpu() for k, v in stats.items()}, str(tmp))
        os.replace(tmp, stats_file)
    if eval_file.is_file():
        evaluation = json.loads(eval_file.read_text())
        log(f"reusing the final evaluation in {eval_file}")
    else:
        evaluation = evaluate_base(model, tok, data_dir, stats, cfg.train.seq_len)
        write_json(eval_file, evaluation)
    t = cfg.train
    evaluation.update({
        "train_seconds": train_seconds, "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "train_tokens": t.steps * t.batch_size * t.seq_len, "history": history, "probe_sample": t.probe_sample,
    })
    split = json.loads((data_dir / "data_split.json").read_text())
    extra_files = {n: data_dir / n for n in ("facts_known.jsonl", "facts_new.jsonl", "data_split.json",
                                                 "heldout_domains.jsonl", "heldout_text.jsonl")}
    templates = {"statements": STATEMENTS, "questions": QUESTIONS, "probes": PROBES}
    card = write_model_card(cfg, evaluation, split)
    model_dir = save_model(model.float().cpu(), out / "model", tokenizer=tok, memory_stats=stats,
                           extra_json={"evaluation.json": evaluation, "probe_templates.json": templates,
                                       "pretrain_config.json": to_dict(cfg)},
                           extra_files={**extra_files}, values_dtype=dtype)
    (model_dir / "README.md").write_text(card)
    shutil.rmtree(final, ignore_errors=True)  # the model folder now holds it all
    h = evaluation["memory_health"]
    log(f"finished: held-out ppl {evaluation['heldout']['ppl']:.1f}; known-fact probes "
        f"{evaluation['known_probes']['exact_match']:.1%}, new-fact probes {evaluation['new_probes']['exact_match']:.1%}; "
        f"slots read {h['read_share']:.1%}; specific weight on fact tokens {h['fact_token_specific_share']:.1%} "
        f"-> {model_dir}")
    return model_dir
