"""`forgetless serve`: real uvicorn servers in subprocesses on 127.0.0.1, real HTTP.

The fast tests check deltas, hashing, the store and the gate on hand-made tensors; the e2e tests
start servers on the shipped base (store in a temporary folder, 20 retention facts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from forgetless.errors import CheckpointError, ConfigError
from forgetless.evaluate.answers import cut_answer
from forgetless.serve.deltas import (
    SEP,
    apply_delta,
    full_delta,
    row_delta,
    tensors_hash,
)
from forgetless.serve.gate import GateThresholds, decide

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "src" / "forgetless" / "assets" / "forgetless-tiny"
TOKEN = "t0ken-for-tests"


# --------------------------------------------------------------------------- fast tests
def test_tensors_hash_depends_on_bytes_names_and_dtype_not_order():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(2)}
    b = {"y": torch.ones(2), "x": torch.arange(6.0).reshape(2, 3)}
    assert tensors_hash(a) == tensors_hash(b)
    c = dict(a, y=torch.ones(2, dtype=torch.float64))
    d = dict(a, y=torch.tensor([1.0, 1.0 + 2 ** -23]))
    assert len({tensors_hash(a), tensors_hash(c), tensors_hash(d), tensors_hash({"z": a["x"], "y": a["y"]})}) == 4


def test_row_delta_stores_only_changed_rows_and_applies_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    parent = {"values": torch.randn(100, 8, generator=g), "other": torch.randn(4, 4, generator=g)}
    child = {k: v.clone() for k, v in parent.items()}
    child["values"][[3, 50, 97]] += torch.randn(3, 8, generator=g)
    d = row_delta(parent, child)
    assert set(d) == {f"values{SEP}rows", f"values{SEP}values"}
    assert d[f"values{SEP}rows"].tolist() == [3, 50, 97]
    rebuilt = apply_delta(parent, d, "rows")
    assert tensors_hash(rebuilt) == tensors_hash(child)
    assert tensors_hash(parent) != tensors_hash(child)  # the parent is left unchanged


def test_full_and_lora_deltas_apply_deterministically():
    g = torch.Generator().manual_seed(1)
    parent = {"w": torch.randn(6, 5, generator=g)}
    child = {"w": parent["w"] * 2, "tied": parent["w"] * 2}
    full = full_delta(child)
    assert f"tied{SEP}alias" in full and f"tied{SEP}full" not in full  # a tied copy is stored once
    assert tensors_hash(apply_delta(parent, full, "full")) == tensors_hash(child)
    a, b = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    lora = {f"w{SEP}lora_A": a, f"w{SEP}lora_B": b, f"w{SEP}scale": torch.tensor(2.0, dtype=torch.float64)}
    assert len(tensors_hash(lora)) == 64  # a 0-d scale hashes too
    one, two = apply_delta(parent, lora, "lora"), apply_delta(parent, lora, "lora")
    assert tensors_hash(one) == tensors_hash(two)
    assert torch.allclose(one["w"], parent["w"] + 2.0 * b @ a, atol=1e-6)


def test_gate_decision_and_per_request_thresholds_only_tighten():
    th = GateThresholds(min_learned=1.0, max_retention_drop=0.1, max_nll_increase=0.05)
    parent = {"retained": 1.0, "heldout_nll": 3.0}
    assert decide({"learned": 1.0, "retained": 0.95, "heldout_nll": 3.01}, parent, th, True)["passed"]
    d = decide({"learned": 1.0, "retained": 0.5, "heldout_nll": 3.2}, parent, th, True)
    assert not d["passed"] and len(d["reasons"]) == 2 and d["retention_drop"] == pytest.approx(0.5)
    assert not decide({"learned": 0.0, "retained": 1.0, "heldout_nll": 3.0}, parent, th, True)["passed"]
    assert decide({"retained": 1.0, "heldout_nll": 3.0}, parent, th, False)["passed"]  # texts: no probes
    assert th.tightened({"max_retention_drop": 0.05}).max_retention_drop == 0.05
    with pytest.raises(ConfigError):
        th.tightened({"max_retention_drop": 0.5})
    with pytest.raises(ConfigError):
        GateThresholds(min_learned=2.0)


def test_store_blobs_are_content_addressed_and_verified(tmp_path):
    from forgetless.serve.store import Store

    s = Store(tmp_path / "store")
    t = {"a": torch.arange(10, dtype=torch.int64), "b": torch.ones(3)}
    digest, n = s.write_blob(t, {"kind": "rows"})
    assert digest == tensors_hash(t) and n > 0
    assert tensors_hash(s.read_blob(digest)) == digest
    s.init_base("h" * 64, "m")
    with pytest.raises(CheckpointError):
        Store(tmp_path / "store").init_base("x" * 64, "m")  # another base model
    s.add_update("u1", {"method": "smf"}, "token")
    s.tx([("UPDATE updates SET state = 'running' WHERE id = 'u1'", ()),
          s.version_insert({"id": 1, "parent": 0, "weights_hash": "w" * 64, "blob": digest, "status": "promoted"})])
    orphan, _ = s.write_blob({"c": torch.zeros(2)}, {})  # written, but a crash came before its row
    (s.blobs / f".{orphan}.123.tmp").write_bytes(b"half written")
    assert s.recover() == 1 and s.update("u1")["state"] == "queued"
    assert [p.name for p in s.blobs.iterdir()] == [f"{digest}.safetensors"]  # unnamed blobs are gone
    assert [v["id"] for v in s.chain(1)] == [0, 1]

def test_served_models_names_each_folder_and_refuses_bad_or_twice_used_names():
    from forgetless.serve.cli import served_models

    assert served_models(str(MODEL), ["b=/x/y"]) == [("forgetless-tiny", MODEL), ("b", Path("/x/y"))]
    assert served_models(None, [])[0][0] == "forgetless-tiny"  # the shipped base
    for bad in (["b"], ["=dir"], ["b="], ["a b=dir"]):
        with pytest.raises(ConfigError):
            served_models(None, bad)
    with pytest.raises(ConfigError, match="named 'forgetless-tiny'"):
        served_models(str(MODEL), [f"forgetless-tiny={MODEL}"])


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, store: Path, token: bool = True, fault: str | None = None, args: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        env.pop("FORGETLESS_TOKEN", None)
        if token:
            env["FORGETLESS_TOKEN"] = TOKEN
        if fault:
            env["FORGETLESS_SERVE_FAULT"] = fault
        cmd = [sys.executable, "-m", "forgetless.cli", "serve", str(MODEL), "--port", str(self.port),
               "--store", str(store), "--retention-facts", "20", "--heldout-tokens", "1024", "--threads", "1", *args]
        self.log = open(store.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_up()

    def wait_up(self, timeout: float = 150) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def call(self, method: str, path: str, body=None, token: str | None = TOKEN, **kw):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, json=body, headers=headers, timeout=120, **kw)

    def ask(self, prompt: str) -> dict:
        r = self.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    def answer(self, prompt: str) -> str:
        return cut_answer(self.ask(prompt)["choices"][0]["text"])

    def wait_update(self, uid: str, timeout: float = 240) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            u = self.call("GET", f"/updates/{uid}").json()
            if u["state"] in ("done", "failed"):
                return u
            time.sleep(0.3)
        raise AssertionError(f"update {uid} did not finish")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def new_fact(i: int = 0) -> dict:
    """A built-in new fact (its held-out probe 'Tell me the ...' is never a training template)."""
    lines = (MODEL / "facts_new.jsonl").read_text().splitlines()
    f = json.loads(lines[i])
    return {k: f[k] for k in ("statement", "question", "answer", "paraphrases")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shipped base served twice: as 'forgetless-tiny' (the default) and as the specialist 'b'."""
    srv = Server(tmp_path_factory.mktemp("serve") / "store", args=("--model", f"b={MODEL}"))
    yield srv
    srv.stop()


@pytest.mark.e2e
def test_teach_promote_answers_then_rollback_restores_hash(server):
    fact = new_fact(0)  # the capital of Andorra: Andorra la Vella
    before = server.ask(fact["question"])
    v0 = before["forgetless_version"], before["forgetless_hash"]
    assert server.answer(fact["question"]) != fact["answer"]
    r = server.call("POST", "/learn", {"facts": [fact], "promote": "manual"})
    assert r.status_code == 202, r.text
    uid = r.json()["update"]
    # generation while learning: only promoted versions (here the base), with their hashes
    seen = set()
    while server.call("GET", f"/updates/{uid}").json()["state"] in ("queued", "running"):
        out = server.ask("Question: Tell me the capital of France. Answer:")
        seen.add((out["forgetless_version"], out["forgetless_hash"]))
    assert seen <= {v0} and seen
    u = server.wait_update(uid)
    assert u["state"] == "done" and u["status"] == "candidate", u
    assert u["figures"]["learned"] == 1.0 and u["gate"]["passed"]
    assert server.ask(fact["question"])["forgetless_version"] == 0  # a candidate is not served
    r = server.call("POST", "/promote", {"version": u["version"]})
    assert r.status_code == 200 and r.json()["served"]["hash"] == u["hash"]
    after = server.ask(fact["question"])
    assert (after["forgetless_version"], after["forgetless_hash"]) == (u["version"], u["hash"])
    assert server.answer(fact["question"]) == fact["answer"]
    vs = server.call("GET", "/versions").json()
    v = next(x for x in vs["versions"] if x["version"] == u["version"])
    assert v["delta"] == "rows" and v["status"] == "promoted" and v["parent"] == 0 and v["bytes"] < 2_000_000
    # rollback: the base's hash again, and the answer is gone
    r = server.call("POST", "/rollback", {"version": 0})
    assert r.status_code == 200 and r.json()["served"]["hash"] == v0[1]
    back = server.ask(fact["question"])
    assert (back["forgetless_version"], back["forgetless_hash"]) == v0
    assert server.answer(fact["question"]) != fact["answer"]
    # forward again: version 1 rebuilt from its delta has the hash it was promoted with
    r = server.call("POST", "/rollback", {"version": u["version"]})
    assert r.status_code == 200 and r.json()["served"]["hash"] == u["hash"]
    assert server.answer(fact["question"]) == fact["answer"]
    metrics = server.call("GET", "/metrics").text
    assert f'forgetless_version_retention{{model="forgetless-tiny",version="{u["version"]}"}}' in metrics
    assert 'forgetless_updates_total{model="forgetless-tiny",outcome="accepted"}' in metrics


@pytest.mark.e2e
def test_forgetting_update_is_rejected_and_previous_version_keeps_serving(server):
    served = server.call("GET", "/health").json()
    r = server.call("POST", "/learn", {"facts": [new_fact(2)], "method": "full", "options": {"lr": 1e-3},
                                       "steps": 8})
    assert r.status_code == 202, r.text
    u = server.wait_update(r.json()["update"])
    assert u["state"] == "done" and u["status"] == "rejected", u
    assert not u["gate"]["passed"] and u["gate"]["retention_drop"] > 0.15
    assert any("retention drop" in x for x in u["gate"]["reasons"])
    now = server.ask("Question: Tell me the capital of France. Answer:")
    assert (now["forgetless_version"], now["forgetless_hash"]) == (served["version"], served["hash"])
    r = server.call("POST", "/promote", {"version": u["version"]})
    assert r.status_code == 409 and "rejected" in r.json()["error"]["message"]
    vs = server.call("GET", "/versions").json()["versions"]
    rej = next(x for x in vs if x["version"] == u["version"])
    assert rej["status"] == "rejected" and rej["delta"] == "full" and "retained" in rej["figures"]


@pytest.mark.e2e
def test_auth_401_without_or_with_wrong_token(server):
    body = {"facts": [new_fact(4)]}
    for path, b in (("/learn", body), ("/promote", {"version": 0}), ("/rollback", {"version": 0})):
        r = server.call("POST", path, b, token=None)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = server.call("POST", path, b, token="wrong")
        assert r.status_code == 401
    assert server.call("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}, token=None).status_code == 200


@pytest.mark.e2e
def test_bad_requests_get_4xx_json_errors(server):
    import httpx

    fact = new_fact(0)
    cases = [
        ("POST", "/v1/completions", {}),  # no prompt
        ("POST", "/v1/completions", {"prompt": 5}),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 100000}),
        ("POST", "/v1/completions", {"prompt": "word " * 300}),  # longer than the context
        ("POST", "/v1/completions", {"prompt": "x", "temperature": -1}),
        ("POST", "/v1/completions", {"prompt": "x", "stream": True}),
        ("POST", "/v1/completions", {"prompt": "x", "n": 3}),
        ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}),  # a model this server does not have
        ("GET", "/versions?model=gpt-4", None),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),  # no chat template
        ("POST", "/learn", {}),  # nothing to learn
        ("POST", "/learn", {"facts": [{"statement": "A is B.", "question": "A?"}]}),  # no answer
        ("POST", "/learn", {"facts": [{"statement": "A is B.", "question": "A?", "answer": "C"}]}),  # not in statement
        ("POST", "/learn", {"facts": [fact], "method": "nope"}),
        ("POST", "/learn", {"facts": [fact], "options": {"bogus": 1}}),
        ("POST", "/learn", {"facts": [fact] * 17}),  # over the facts limit
        ("POST", "/learn", {"facts": [fact], "steps": 1000}),  # over the steps limit
        ("POST", "/learn", {"facts": [fact], "gate": {"max_retention_drop": 0.9}}),  # looser than the server
        ("POST", "/learn", {"facts": [fact], "colour": "red"}),  # unknown field
        ("POST", "/promote", {"version": 999}),
        ("POST", "/promote", {"version": "one"}),
        ("POST", "/rollback", {"version": 999}),
        ("GET", "/updates/nope", None),
        ("GET", "/nowhere", None),
        ("DELETE", "/versions", None),
    ]
    for method, path, body in cases:
        r = server.call(method, path, body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "Traceback" not in r.text, (path, body)
    raw = [httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
           httpx.post(server.url + "/learn", content=b"x" * (2 << 20),
                      headers={"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"})]
    assert [r.status_code for r in raw] == [400, 413]
    assert all(r.json()["error"]["message"] for r in raw)
    assert len(cases) + len(raw) >= 15


@pytest.mark.e2e
def test_specialists_learn_and_roll_back_apart(server):
    """Two models on one server: an update of 'b' is served by 'b' only, with its own version log."""
    names = [m["id"] for m in server.call("GET", "/v1/models").json()["data"]]
    assert names == ["forgetless-tiny", "b"]
    fact = new_fact(6)
    ask = {"prompt": fact["question"], "max_tokens": 8, "temperature": 0}
    base_b = server.call("POST", "/v1/completions", {**ask, "model": "b"}).json()
    assert base_b["model"] == "b" and base_b["forgetless_version"] == 0
    r = server.call("POST", "/learn", {"model": "b", "facts": [fact]})
    assert r.status_code == 202 and r.json()["model"] == "b", r.text
    u = server.wait_update(r.json()["update"])
    assert u["model"] == "b" and u["status"] == "promoted", u
    got_b = server.call("POST", "/v1/completions", {**ask, "model": "b"}).json()
    assert (got_b["forgetless_version"], got_b["forgetless_hash"]) == (u["version"], u["hash"])
    assert cut_answer(got_b["choices"][0]["text"]) == fact["answer"]
    other = server.call("POST", "/v1/completions", {**ask, "model": "forgetless-tiny"}).json()
    assert other["forgetless_hash"] != u["hash"] and cut_answer(other["choices"][0]["text"]) != fact["answer"]
    assert all(v["update"] != u["id"] for v in server.call("GET", "/versions").json()["versions"])
    health = server.call("GET", "/health?model=b").json()
    assert health["model"] == "b" and health["hash"] == u["hash"] and set(health["models"]) == {"forgetless-tiny", "b"}
    r = server.call("POST", "/rollback", {"model": "b"})
    assert r.status_code == 200 and r.json()["served"]["hash"] == base_b["forgetless_hash"]
    assert 'forgetless_served_version{model="b"} 0.0' in server.call("GET", "/metrics").text


@pytest.mark.e2e
def test_openai_client_completes_a_prompt(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    prompt = "Question: Tell me the capital of France. Answer:"
    out = client.completions.create(model="forgetless-tiny", prompt=prompt, max_tokens=4, temperature=0)
    direct = server.ask(prompt)  # the same greedy completion of the same version over plain HTTP
    assert out.choices[0].text == server.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 4,
                                                                          "temperature": 0}).json()["choices"][0]["text"]
    assert out.choices[0].text.strip() and out.usage.completion_tokens == 4
    assert direct["forgetless_version"] == server.call("GET", "/health").json()["version"]
    health = server.call("GET", "/health").json()
    assert out.system_fingerprint == f"v{health['version']}-{health['hash'][:16]}"
    with pytest.raises(openai.BadRequestError):  # the shipped base has no chat template
        client.chat.completions.create(model="forgetless-tiny", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.e2e
def test_kill_9_while_learning_and_while_promoting_recovers(tmp_path):
    """kill -9 during training, before the promotion commit and after it (before the swap): each
    restart serves exactly the last promoted version, and the update finishes exactly once. The
    last restart has no token: learning, promotion and rollback are then off (403), not open."""
    store = tmp_path / "store"
    loose = ("--min-learned", "0", "--max-retention-drop", "1", "--max-nll-increase", "10", "--retention-facts", "10")
    body = {"facts": [new_fact(0)], "steps": 1}
    srv = Server(store, fault="train", args=loose)
    base = srv.call("GET", "/health").json()
    uid = srv.call("POST", "/learn", body).json()["update"]
    assert srv.proc.wait(120) == -signal.SIGKILL  # killed while learning
    srv.log.close()
    expect = (0, base["hash"])
    for fault, served_after in (("promote", None), ("swap", "new"), (None, "new")):
        srv = Server(store, fault=fault, args=loose, token=fault is not None)
        h = srv.call("GET", "/health").json()
        assert (h["version"], h["hash"]) == expect  # exactly the last promoted version
        if fault is None:
            break
        assert h["requeued_at_start"] == 1
        assert srv.proc.wait(120) == -signal.SIGKILL  # the re-queued update ran and was killed again
        srv.log.close()
        if served_after == "new":  # the promotion had committed before the kill
            import sqlite3

            db = sqlite3.connect(store / "versions.db")
            vid, vhash = db.execute("SELECT id, weights_hash FROM versions WHERE update_id = ?", (uid,)).fetchone()
            db.close()
            expect = (vid, vhash)
    try:
        u = srv.wait_update(uid)
        assert u["state"] == "done" and u["status"] == "promoted" and u["attempts"] == 3
        assert (u["version"], u["hash"]) == expect
        vs = srv.call("GET", "/versions").json()["versions"]
        assert [v["update"] for v in vs].count(uid) == 1  # applied once
        assert h["requeued_at_start"] == 0
        assert srv.ask(new_fact(0)["question"])["forgetless_hash"] == expect[1]
        assert srv.call("GET", "/health").json()["learning"] is False
        for path, b in (("/learn", body), ("/promote", {"version": 0}), ("/rollback", {})):
            for tok in (None, TOKEN):
                r = srv.call("POST", path, b, token=tok)
                assert r.status_code == 403 and "off" in r.json()["error"]["message"]
    finally:
        srv.stop()
