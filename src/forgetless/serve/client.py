"""A small client of a running ``forgetless serve`` (httpx): learn, ask, versions, promote, rollback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from ..errors import ForgetlessError


class ServeClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120.0,
                 model: str | None = None):
        self.model = model  # None: the server's default model
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, body: Any = None) -> dict:
        params = None
        if self.model is not None:
            if isinstance(body, dict):
                body = {"model": self.model, **body}
            elif method == "GET":
                params = {"model": self.model}
        try:
            r = self.http.request(method, path, json=body, params=params)
        except httpx.HTTPError as e:
            raise ForgetlessError(f"cannot reach the server at {self.http.base_url} ({e}).") from None
        try:
            data = r.json()
        except ValueError:
            raise ForgetlessError(f"the server answered {r.status_code} without JSON.") from None
        if r.status_code >= 400:
            raise ForgetlessError(f"the server refused ({r.status_code}): {data.get('error', {}).get('message', data)}")
        return data

    def ask(self, prompt: str, max_tokens: int = 16, temperature: float = 0.0) -> dict:
        return self._call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": temperature})

    def learn(self, facts: list[dict], wait: bool = False, poll: float = 0.5, timeout: float = 600, **kw) -> dict:
        out = self._call("POST", "/learn", {"facts": facts, **kw})
        if not wait:
            return out
        t0 = time.time()
        while time.time() - t0 < timeout:
            u = self.update(out["update"])
            if u["state"] in ("done", "failed"):
                return u
            time.sleep(poll)
        raise ForgetlessError(f"update {out['update']} did not finish in {timeout:.0f} s.")

    def update(self, uid: str) -> dict:
        return self._call("GET", f"/updates/{uid}")

    def versions(self) -> dict:
        return self._call("GET", "/versions")

    def promote(self, version: int) -> dict:
        return self._call("POST", "/promote", {"version": version})

    def rollback(self, version: int | None = None) -> dict:
        return self._call("POST", "/rollback", {} if version is None else {"version": version})


def read_token(token_file: str | None) -> str | None:
    """The token of ``token_file``, else of FORGETLESS_TOKEN, else None."""
    if token_file:
        p = Path(token_file)
        if not p.is_file():
            raise ForgetlessError(f"token file {p} does not exist.")
        tok = p.read_text().strip()
        if not tok:
            raise ForgetlessError(f"token file {p} is empty.")
        return tok
    return os.environ.get("FORGETLESS_TOKEN") or None


def read_facts_jsonl(path: str) -> list[dict]:
    """The objects of a fact file (validated by the server, which names bad facts)."""
    from ..data.factfile import load_fact_file

    load_fact_file(path)  # the same validation as `forgetless learn`, before anything is sent
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
