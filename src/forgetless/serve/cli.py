"""`forgetless serve` and `forgetless client ...` (argparse wiring; the work is in the package)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _default_model_dir() -> Path:
    env = os.environ.get("FORGETLESS_MODEL")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "assets" / "forgetless-tiny"


def served_models(positional: str | None, named: list[str]) -> list[tuple[str, Path]]:
    """(name, folder) of every model to serve: MODEL (named after its folder) and each --model NAME=DIR,
    in that order; the shipped base when neither is given."""
    from ..errors import ConfigError

    out: list[tuple[str, Path]] = []
    if positional:
        out.append((Path(positional).name, Path(positional)))
    for item in named:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ConfigError(f"--model takes NAME=DIR, got {item!r}.")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"a model name takes letters, digits, '-', '_' and '.', got {name!r}.")
        out.append((name, Path(folder)))
    if not out:
        d = _default_model_dir()
        out.append((d.name, d))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two served models are named {dup[0]!r}; name them apart with --model NAME=DIR.")
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .client import read_token
    from .gate import GateThresholds
    from .metrics import Metrics
    from .service import ServeConfig, Service

    models = served_models(args.model, args.models or [])
    store_root = Path(args.store) if args.store else None
    metrics = Metrics()
    token = read_token(args.token_file)  # read once: the same token guards every served model
    services = []
    for name, model_dir in models:
        if store_root is None:
            store = Path("runs") / "serve" / name
        else:  # one model: the store is the folder given; several: a sub-folder each
            store = store_root if len(models) == 1 else store_root / name
        cfg = ServeConfig(model_dir=model_dir, store_dir=store, name=name,
                          token=token, protect_generation=args.protect_generation,
                          auto_promote=not args.manual_promote, method=args.method,
                          gate=GateThresholds(args.min_learned, args.max_retention_drop, args.max_nll_increase),
                          retention_facts=args.retention_facts, heldout_tokens=args.heldout_tokens,
                          max_body_bytes=args.max_body_bytes, max_facts=args.max_facts, max_steps=args.max_steps,
                          max_new_tokens=args.max_new_tokens, max_queue=args.max_queue, threads=args.threads,
                          seed=args.seed)
        service = Service(cfg, metrics)
        v = service.current
        print(f"forgetless serve: model {name!r} ({model_dir}) version {v.version} ({v.weights_hash[:12]}); "
              f"store {cfg.store_dir}", flush=True)
        services.append(service)
    print(f"forgetless serve: {len(services)} model{'s' if len(services) > 1 else ''} on http://{args.host}:{args.port}; "
          f"learning {'on' if services[0].cfg.token else 'off (no token)'}", flush=True)
    uvicorn.run(create_app(services), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _client(args: argparse.Namespace):
    from .client import ServeClient, read_token

    return ServeClient(args.url, read_token(args.token_file), model=args.model)


def cmd_client(args: argparse.Namespace) -> int:
    from .client import read_facts_jsonl

    c = _client(args)
    if args.action == "ask":
        r = c.ask(args.prompt, max_tokens=args.max_tokens)
        print(args.prompt + r["choices"][0]["text"])
        print(f"(version {r['forgetless_version']}, {r['forgetless_hash'][:12]})")
        return 0
    if args.action == "learn":
        extra = {"method": args.method} if args.method else {}
        if args.steps:
            extra["steps"] = args.steps
        r = c.learn(read_facts_jsonl(args.facts), wait=not args.no_wait, **extra)
        if not args.json and r.get("state") == "done":
            fig, gate = r["figures"], r["gate"]
            print(f"update {r['id']}: version {r['version']} {r['status']} ({r['hash'][:12]}, {r['bytes']:,} bytes); "
                  f"learned {fig.get('learned', float('nan')):.2f}, retained {fig['retained']:.2f} "
                  f"(drop {gate['retention_drop']:.2f}), held-out NLL {gate['nll_increase']:+.4f}"
                  + (f"; rejected: {'; '.join(gate['reasons'])}" if gate["reasons"] else ""))
            return 0 if r["status"] != "rejected" else 1
        if not args.json and r.get("state") == "failed":
            print(f"update {r['id']} failed: {r['error']}")
            return 1
    elif args.action == "versions":
        r = c.versions()
        if not args.json:
            for v in r["versions"]:
                fig = v["figures"]
                print(f"{'*' if v['served'] else ' '} v{v['version']:<3} {v['status']:<9} {v['method'] or '':<5} "
                      f"{v['hash'][:12]}  retained {fig.get('retained', float('nan')):.2f}  "
                      f"{'; '.join(v['taught'])[:60]}")
            return 0
    else:
        r = c.promote(args.version) if args.action == "promote" else c.rollback(args.version)
        if not args.json:
            print(f"serving version {r['served']['version']} ({r['served']['hash'][:12]})")
            return 0
    print(json.dumps(r, indent=1))
    return 0


def add_commands(sub) -> None:
    """Add `serve` and `client` to the `forgetless` sub-command parser."""
    sp = sub.add_parser("serve", help="serve a model over HTTP that keeps learning (versions, rollback, gate)",
                        description="Serve MODEL with an OpenAI-compatible API; POST /learn teaches it facts in a "
                                    "background worker, every update becomes a gated, versioned delta. See docs/serve.md.")
    sp.add_argument("model", nargs="?", default=None, help="model folder (default: the shipped base unless "
                    "--model is given)")
    sp.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=DIR",
                    help="serve the model folder DIR as NAME (repeat for a set of specialists; requests choose one "
                         "with their 'model' field, the first is the default)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--store", default=None, help="version store folder (default runs/serve/<model name>; with "
                    "several models, one sub-folder per name)")
    sp.add_argument("--token-file", default=None, help="file holding the bearer token (else env FORGETLESS_TOKEN; "
                    "with neither, learning, promotion and rollback are off)")
    sp.add_argument("--protect-generation", action="store_true", help="completions need the token too")
    sp.add_argument("--manual-promote", action="store_true", help="candidates that pass wait for POST /promote")
    sp.add_argument("--method", default=None, help="default learning method (default smf on a memory model, else lora)")
    sp.add_argument("--min-learned", type=float, default=1.0, help="gate: fraction of taught probes answered")
    sp.add_argument("--max-retention-drop", type=float, default=0.15, help="gate: retention-set drop vs the parent")
    sp.add_argument("--max-nll-increase", type=float, default=0.05, help="gate: held-out NLL rise vs the parent")
    sp.add_argument("--retention-facts", type=int, default=20, help="known facts (answered by the base) in the "
                    "retention set")
    sp.add_argument("--heldout-tokens", type=int, default=4096, help="held-out text tokens scored by the gate")
    sp.add_argument("--max-body-bytes", type=int, default=1 << 20)
    sp.add_argument("--max-facts", type=int, default=16, help="facts per learn request")
    sp.add_argument("--max-steps", type=int, default=64, help="training steps per update")
    sp.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion")
    sp.add_argument("--max-queue", type=int, default=8, help="updates queued or running")
    sp.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--log-level", default="warning")
    sp.set_defaults(func=cmd_serve)

    cp = sub.add_parser("client", help="talk to a running `forgetless serve`: learn, ask, versions, promote, rollback")
    cp.add_argument("--url", default=os.environ.get("FORGETLESS_URL", "http://127.0.0.1:8000"))
    cp.add_argument("--token-file", default=None, help="bearer token file (else env FORGETLESS_TOKEN)")
    cp.add_argument("--json", action="store_true", help="print the server's JSON answers")
    cp.add_argument("--model", default=None, help="the served model to talk to (default: the server's first)")
    csub = cp.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = csub.add_parser("ask", help="complete a prompt (greedy)")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=8)
    p = csub.add_parser("learn", help="teach the facts of a JSONL fact file and wait for the gate")
    p.add_argument("facts")
    p.add_argument("--method", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--no-wait", action="store_true", help="return the update id at once")
    p = csub.add_parser("versions", help="the version log")
    p = csub.add_parser("promote", help="serve a candidate that passed the gate")
    p.add_argument("version", type=int)
    p = csub.add_parser("rollback", help="serve an earlier promoted version again (default: the previous one)")
    p.add_argument("version", type=int, nargs="?", default=None)
    cp.set_defaults(func=cmd_client)
