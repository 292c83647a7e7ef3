"""`forgetless serve` over loopback: latency, throughput, time to learn, rollback, bytes per version.

Starts one server on 127.0.0.1 (a fresh store in a temporary folder) and measures

- completion latency p50/p99 and throughput (requests/s, sequential greedy requests of
  ``--max-tokens`` tokens) on an idle server, then while an update is learning, and their ratio;
- per method (smf, lora, full): seconds from POST /learn of ONE new fact (a built-in new fact with
  its held-out probe) to the first completion of the promoted version that answers the probe,
  with the update's training seconds and gate figures;
- rollback latency (to the base, which is kept in memory, and to a version rebuilt from deltas);
- bytes stored per version (its delta blob) per method.

The server runs with a permissive gate (every candidate is promoted) so that each method's
time to an answering version is measured; the gate figures are printed next to it, with what the
default gate (``--max-retention-drop 0.15 --max-nll-increase 0.05``) would have decided.
Bounded: at most ``--requests`` completions per phase, one fact per method, ``--max-seconds`` in all.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/serve.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "src" / "forgetless" / "assets" / "forgetless-tiny"
TOKEN = "bench-token"
PROMPT = "Question: Tell me the capital of France. Answer:"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=30, help="completions per latency phase")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--methods", default="smf,lora,full")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server below is stopped too
    t_start = time.time()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="forgetless-bench-serve-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FORGETLESS_TOKEN": TOKEN}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "forgetless.cli", "serve", str(MODEL), "--port", str(port),
                             "--store", str(tmp / "store"), "--threads", str(args.threads),
                             "--min-learned", "0", "--max-retention-drop", "1", "--max-nll-increase", "10"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
    try:
        t0 = time.time()
        while True:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() - t0 > 300:
                raise SystemExit(f"the server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        startup = time.time() - t0
        facts = [json.loads(x) for x in (MODEL / "facts_new.jsonl").read_text().splitlines()]

        def ask(prompt: str) -> dict:
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0})
            r.raise_for_status()
            return r.json()

        def phase(while_update: str | None) -> dict:
            lat = []
            t = time.time()
            for _ in range(args.requests):
                if while_update and http.get(f"/updates/{while_update}").json()["state"] not in ("queued", "running"):
                    break
                a = time.time()
                ask(PROMPT)
                lat.append(time.time() - a)
            wall = time.time() - t
            return {"n": len(lat), "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
                    "mean_ms": 1000 * statistics.fmean(lat), "req_per_s": len(lat) / wall}

        ask(PROMPT)  # warm-up
        idle = phase(None)
        # a slow update (full fine-tuning, 8 steps) to measure generation while learning
        uid = http.post("/learn", json={"facts": [facts[10]], "method": "full", "steps": 8}).json()["update"]
        while http.get(f"/updates/{uid}").json()["state"] == "queued":
            time.sleep(0.05)
        busy = phase(uid)
        while http.get(f"/updates/{uid}").json()["state"] in ("queued", "running"):
            time.sleep(0.2)
        print(f"server start-up {startup:.1f} s (model load, retention set, held-out NLL)")
        print(f"completion latency, {args.max_tokens} tokens, sequential:")
        print("| phase | requests | p50 ms | p99 ms | requests/s |\n|---|---|---|---|---|")
        for name, p in (("idle", idle), ("while learning", busy)):
            print(f"| {name} | {p['n']} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | {p['req_per_s']:.2f} |")
        print(f"throughput while learning / idle: {busy['req_per_s'] / idle['req_per_s']:.2f}x; "
              f"p50 latency ratio {busy['p50_ms'] / idle['p50_ms']:.2f}x")

        rows = []
        for i, m in enumerate(args.methods.split(",")):
            if time.time() - t_start > args.max_seconds:
                print(f"stopped: --max-seconds {args.max_seconds:.0f} reached")
                break
            http.post("/rollback", json={"version": 0})  # every method learns on the base
            f = facts[20 + i]
            a = time.time()
            uid = http.post("/learn", json={"facts": [{k: f[k] for k in ("statement", "question", "answer",
                                                                        "paraphrases")}], "method": m}).json()["update"]
            answered, to_answer = False, None
            while time.time() - a < 600:
                u = http.get(f"/updates/{uid}").json()
                if u["state"] in ("done", "failed"):
                    break
                time.sleep(0.1)
            if u["state"] == "done" and u["status"] == "promoted":
                out = ask(f["question"])
                answered = out["choices"][0]["text"].strip().startswith(f["answer"])
                to_answer = time.time() - a
            fig = u.get("figures", {})
            gate = u.get("gate", {})
            default_ok = (fig.get("learned", 0) >= 1.0 and gate.get("retention_drop", 1) <= 0.15 + 1e-9
                          and gate.get("nll_increase", 1) <= 0.05)
            rows.append({"method": m, "fact": f["id"], "seconds_to_answer": to_answer, "answered": answered,
                         "train_seconds": fig.get("train_seconds"), "learned": fig.get("learned"),
                         "retention_drop": gate.get("retention_drop"), "nll_increase": gate.get("nll_increase"),
                         "bytes": u.get("bytes"), "version": u.get("version"), "default_gate": default_ok})
        print("\none new fact per method, POST /learn -> promoted version answering its held-out probe:")
        print("| method | seconds to answer | training s | answered | retention drop | NLL change | default gate "
              "| bytes stored |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['seconds_to_answer'] or float('nan'):.1f} | {r['train_seconds'] or 0:.1f} | "
                  f"{'yes' if r['answered'] else 'no'} | {r['retention_drop'] or 0:.2f} | {r['nll_increase'] or 0:+.4f} "
                  f"| {'pass' if r['default_gate'] else 'reject'} | {r['bytes'] or 0:,} |")
        base_bytes = (MODEL / "model.safetensors").stat().st_size
        print(f"(the base's model.safetensors: {base_bytes:,} bytes)")

        rb = {}
        for name, target in (("to the base (in memory)", 0),
                             ("to a version rebuilt from its deltas", next((r["version"] for r in rows
                                                                           if r["method"] == "smf"), None))):
            if target is None:
                continue
            if http.get("/health").json()["version"] == target:
                http.post("/rollback", json={"version": 0})
            times = []
            for _ in range(3):
                a = time.time()
                r = http.post("/rollback", json={"version": target})
                r.raise_for_status()
                times.append(time.time() - a)
                other = 0 if target else rows[0]["version"]
                http.post("/rollback", json={"version": other})
            rb[name] = statistics.median(times)
        print("\nrollback latency (POST /rollback until the response; median of 3):")
        for k, v in rb.items():
            print(f"- {k}: {1000 * v:.0f} ms")
        print(f"\nbenchmark wall time {time.time() - t_start:.0f} s")
        if args.out:
            Path(args.out).write_text(json.dumps({"idle": idle, "while_learning": busy, "methods": rows,
                                                  "rollback_s": rb, "startup_s": startup}, indent=1))
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


if __name__ == "__main__":
    main()
