"""The `forgetless` command: a thin layer over the Python API.

Every error a user can cause ends with one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ForgetlessError


def default_model_dir() -> Path:
    """The shipped base (``FORGETLESS_MODEL`` overrides it)."""
    env = os.environ.get("FORGETLESS_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "assets" / "forgetless-tiny"


def _model_arg(p: argparse.ArgumentParser, positional: bool = False) -> None:
    help_ = "model folder (default: the shipped base, or $FORGETLESS_MODEL)"
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--model", default=None, help=help_)


# --------------------------------------------------------------------------- commands
def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import load_pretrain_config, pretrain

    cfg = load_pretrain_config(args.config)
    if args.device:
        cfg.train.device = args.device
    if args.steps:
        cfg.train.steps = args.steps
    model_dir = pretrain(cfg, args.out, resume=not args.restart, progress=not args.no_progress)
    print(f"model written to {model_dir}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import model_info, format_info

    info = model_info(args.model or default_model_dir())
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .models.checkpoint import load_model
    from .models.tokenizer import load_tokenizer

    model_dir = Path(args.model or default_model_dir())
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    torch.manual_seed(args.seed)
    enc = tok([args.prompt], return_tensors="pt")
    if enc["input_ids"].shape[1] + args.max_new_tokens > model.config.max_position_embeddings:
        raise ForgetlessError(f"the prompt is too long: prompt plus --max-new-tokens must fit in "
                              f"{model.config.max_position_embeddings} tokens.")
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if args.sample:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    else:
        kw.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(args.prompt + text)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forgetless", description="Continual learning of language models: "
                                "teach new knowledge without forgetting, and measure it.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("pretrain", help="pretrain a base model from a YAML config",
                        description="Pretrain a base model (tokenizer, Llama + product-key memory) from a config. "
                                    "Resumes from OUT/checkpoint when it exists.")
    sp.add_argument("--config", required=True, help="YAML config, e.g. configs/forgetless-tiny.yaml")
    sp.add_argument("--out", required=True, help="output folder (the model lands in OUT/model)")
    sp.add_argument("--device", default=None, help="cpu, cuda, ... (default: config's train.device)")
    sp.add_argument("--steps", type=int, default=None, help="override train.steps")
    sp.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("info", help="describe a model: parameters, memory layers, tokenizer, data, health",
                        description="Describe a model folder: parameter counts, memory layers and slots, tokenizer, "
                                    "data splits, slot-usage health and fact-probe accuracy.")
    _model_arg(sp, positional=True)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("generate", help="continue a prompt (greedy or sampled)",
                        description="Continue a prompt with a model: greedy by default, --sample for sampling.")
    _model_arg(sp)
    sp.add_argument("--prompt", required=True, help="text to continue")
    sp.add_argument("--max-new-tokens", type=int, default=40)
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ForgetlessError as e:
        print(f"forgetless: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forgetless: interrupted; saved checkpoints are intact (rerun the same command to resume).",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
