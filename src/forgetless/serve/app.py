"""The HTTP API (FastAPI): OpenAI-compatible generation, learning, versions, metrics.

Every error is a JSON body ``{"error": {"message", "type", "code"}}`` with a 4xx status (the
OpenAI error shape, so its client raises a typed error); nothing returns a traceback.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.factfile import facts_from_objects
from ..errors import ConfigError, ForgetlessError
from ..methods import METHODS
from .service import FALLBACK_DEFAULTS, METHOD_DEFAULTS, Service


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _err(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


# --------------------------------------------------------------------------- request bodies
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server does not use
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class FactIn(Strict):
    statement: str
    question: str
    answer: str
    paraphrases: list[str] = []
    id: str | None = None
    relation: str | None = None
    subject: str | None = None
    country: str | None = None


class GateIn(Strict):
    min_learned: float | None = None
    max_retention_drop: float | None = None
    max_nll_increase: float | None = None


class LearnRequest(Strict):
    model: str | None = None
    facts: list[FactIn] = []
    texts: list[str] = []
    method: str | None = None
    options: dict[str, Any] = {}
    steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1, le=64)
    questions: bool = True
    gate: GateIn | None = None
    promote: Literal["auto", "manual"] | None = None


class VersionRef(Strict):
    model: str | None = None
    version: int = Field(ge=0)


class RollbackRequest(Strict):
    model: str | None = None
    version: int | None = Field(None, ge=0)


# --------------------------------------------------------------------------- the app
def create_app(services: Service | list[Service], start_worker: bool = True) -> FastAPI:
    """The app of one served model, or of several specialists (each with its own store, versions,
    gate and learning worker), chosen by the ``model`` field of a request (default: the first)."""
    listed = [services] if isinstance(services, Service) else list(services)
    if not listed:
        raise ConfigError("create_app needs at least one service.")
    by_name = {s.name: s for s in listed}
    if len(by_name) != len(listed):
        raise ConfigError("two served models have the same name: " + ", ".join(s.name for s in listed) + ".")
    default = listed[0]
    cfg = default.cfg  # the server-wide settings (token, body limit) are the same for every model
    app_metrics = default.metrics.all
    gen_locks = {name: threading.Lock() for name in by_name}  # one generation at a time per model

    def pick(name: str | None) -> Service:
        if name is None or name == "":
            return default
        s = by_name.get(name)
        if s is None:
            raise ApiError(404, f"there is no model {name!r} on this server; it serves {', '.join(by_name)}.",
                           code="model_not_found")
        return s

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_worker:
            for s in listed:
                s.start()
        yield
        for s in listed:
            s.stop()

    app = FastAPI(title="forgetless serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.time()
        length = request.headers.get("content-length")
        try:
            if length is not None and int(length) > cfg.max_body_bytes:
                resp = _err(413, f"the request body is {length} bytes; the limit is {cfg.max_body_bytes}.")
            elif length is None and request.method in ("POST", "PUT") and \
                    len(await request.body()) > cfg.max_body_bytes:
                resp = _err(413, f"the request body exceeds the limit of {cfg.max_body_bytes} bytes.")
            else:
                resp = await call_next(request)
        except ValueError:
            resp = _err(400, "the Content-Length header is not a number.")
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "other"
        app_metrics.requests.labels(endpoint=endpoint, status=str(resp.status_code)).inc()
        app_metrics.latency.labels(endpoint=endpoint).observe(time.time() - t0)
        return resp

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _err(e.status, e.message, e.type, e.code)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:3]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _err(400, "bad request: " + "; ".join(parts) + ".", code="invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}.",
               405: f"method {request.method} is not allowed on {request.url.path}."}.get(e.status_code, str(e.detail))
        return _err(e.status_code, msg)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):  # never a traceback to the client
        return _err(500, f"internal error ({type(e).__name__}); the server log has the details.", "server_error")

    # ------------------------------------------------------------------ auth
    def who(request: Request, write: bool) -> str:
        if not write and not cfg.protect_generation:
            return "anonymous"
        if cfg.token is None:
            if write:
                raise ApiError(403, "learning, promotion and rollback are off: the server was started without a "
                                    "token (--token-file or FORGETLESS_TOKEN).", "permission_error", "disabled")
            raise ApiError(403, "generation needs a token, but the server has none.", "permission_error")
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "this endpoint needs 'Authorization: Bearer <token>'.", "authentication_error")
        if not hmac.compare_digest(token.strip().encode(), cfg.token.encode()):
            raise ApiError(401, "the bearer token is wrong.", "authentication_error")
        user = request.headers.get("x-forgetless-user", "").strip()[:64]  # who, for the version log
        return f"token:{user}" if user else "token"

    def version_fields(served) -> dict:
        return {"system_fingerprint": f"v{served.version}-{served.weights_hash[:16]}",
                "forgetless_version": served.version, "forgetless_hash": served.weights_hash}

    # ------------------------------------------------------------------ generation
    def generate(service: Service, prompts: list[str], max_tokens: int, temperature: float, top_p: float, stop, seed):
        if max_tokens > cfg.max_new_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds the limit of {cfg.max_new_tokens}.")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings.")
        if not prompts or len(prompts) > 8:
            raise ApiError(400, "prompt must be a string or a list of 1 to 8 strings.")
        tok = service.tok
        served = service.current  # read once: the whole request uses this version
        out = []
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            n = ids["input_ids"].shape[1]
            if n == 0:
                raise ApiError(400, "the prompt is empty.")
            if n + max_tokens > service.max_positions:
                raise ApiError(400, f"prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                    f"context of {service.max_positions} tokens.")
            kw: dict[str, Any] = dict(max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
            if temperature > 0:
                kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                kw.update(do_sample=False)
            with gen_locks[service.name], torch.no_grad():
                if seed is not None:
                    torch.manual_seed(seed)
                gen = served.model.generate(**ids, **kw)
            new = gen[0, n:]
            text = tok.decode(new, skip_special_tokens=True)
            finish = "length" if new.numel() >= max_tokens else "stop"
            for s in stops:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            service.metrics.tokens.inc(int(new.numel()))
            out.append((text, finish, n, int(new.numel())))
        return served, out

    @app.post("/v1/completions")
    def completions(body: CompletionRequest, request: Request):
        who(request, write=False)
        if body.stream:
            raise ApiError(400, "stream=true is not supported by this server.", code="unsupported")
        if body.echo or body.logprobs:
            raise ApiError(400, "echo and logprobs are not supported by this server.", code="unsupported")
        service = pick(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        served, out = generate(service, prompts, body.max_tokens, body.temperature, body.top_p, body.stop, body.seed)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": service.name,
                "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f}
                            for i, (t, f, _, _) in enumerate(out)],
                "usage": {"prompt_tokens": sum(o[2] for o in out), "completion_tokens": sum(o[3] for o in out),
                          "total_tokens": sum(o[2] + o[3] for o in out)},
                **version_fields(served)}

    @app.post("/v1/chat/completions")
    def chat(body: ChatRequest, request: Request):
        who(request, write=False)
        service = pick(body.model)
        tok = service.tok
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"the model {service.name} has no chat template; use /v1/completions.",
                           code="no_chat_template")
        if body.stream:
            raise ApiError(400, "stream=true is not supported by this server.", code="unsupported")
        prompt = tok.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                         add_generation_prompt=True)
        served, out = generate(service, [prompt], body.max_completion_tokens or body.max_tokens or 64, body.temperature,
                               body.top_p, body.stop, body.seed)
        t, f, pn, cn = out[0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": service.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": t}, "finish_reason": f}],
                "usage": {"prompt_tokens": pn, "completion_tokens": cn, "total_tokens": pn + cn},
                **version_fields(served)}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": s.name, "object": "model", "owned_by": "forgetless",
                                            **version_fields(s.current)} for s in listed]}

    # ------------------------------------------------------------------ learning
    @app.post("/learn", status_code=202)
    def learn(body: LearnRequest, request: Request):
        by = who(request, write=True)
        service = pick(body.model)
        if not body.facts and not body.texts:
            raise ApiError(400, "give 'facts' or 'texts' to learn.")
        if len(body.facts) > cfg.max_facts:
            raise ApiError(400, f"{len(body.facts)} facts in one request; the limit is {cfg.max_facts}.")
        if len(body.texts) > cfg.max_texts or any(not t.strip() for t in body.texts):
            raise ApiError(400, f"texts takes 1 to {cfg.max_texts} non-empty documents.")
        facts, bad = facts_from_objects([(i, {k: v for k, v in f.model_dump().items() if v is not None})
                                         for i, f in enumerate(body.facts)], "request")
        if bad:
            raise ApiError(400, "bad facts (numbered from 0): " + "; ".join(b.replace("line ", "fact ", 1)
                                                                            for b in bad[:5]) + ".")
        for f in facts:
            n = len(service.tok(f.statement)["input_ids"])
            if n > service.max_positions // 2:
                raise ApiError(400, f"a statement has {n} tokens; the limit is {service.max_positions // 2}.")
        for t in body.texts:
            n = len(service.tok(t)["input_ids"])
            if n > service.max_positions:
                raise ApiError(400, f"a text has {n} tokens; the model's context is {service.max_positions}.")
        name = body.method or service.default_method
        if name not in METHODS:
            raise ApiError(400, f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
        if name == "smf" and not service.has_memory:
            raise ApiError(400, "method smf needs a model with memory layers; this one has none (use lora).")
        defaults = METHOD_DEFAULTS.get(name, FALLBACK_DEFAULTS)
        options = {**defaults.get("options", {}), **body.options}
        if "lr" not in options and "lr" in defaults:
            options["lr"] = defaults["lr"]
        try:
            from ..methods import make_method

            make_method(name, **options)  # options checked now, not in the worker
            gate = cfg.gate.tightened(body.gate.model_dump(exclude_none=True) if body.gate else None)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        steps = body.steps or defaults["steps"]
        if steps * max(len(facts) + len(body.texts), 1) > cfg.max_steps:
            raise ApiError(400, f"{steps} steps x {len(facts) + len(body.texts)} items exceeds the limit of "
                                f"{cfg.max_steps} training steps per update.")
        from dataclasses import asdict

        req = {"facts": [asdict(f) for f in facts], "texts": body.texts, "method": name, "options": options,
               "steps": steps, "batch_size": body.batch_size or cfg.batch_size, "questions": body.questions,
               "gate": asdict(gate), "promote": body.promote or ("auto" if cfg.auto_promote else "manual")}
        try:
            uid = service.submit(req, by)
        except OverflowError as e:
            raise ApiError(429, str(e), "rate_limit_error") from None
        return {"update": uid, "model": service.name, "state": "queued", "url": f"/updates/{uid}"}

    @app.get("/updates/{uid}")
    def update(uid: str):
        service, u = next(((s, u) for s in listed if (u := s.store.update(uid)) is not None), (None, None))
        if u is None:
            raise ApiError(404, f"there is no update {uid!r}.", code="not_found")
        out = {k: u[k] for k in ("id", "state", "version", "error", "attempts", "created", "started", "finished")}
        out.update(model=service.name, method=u["request"]["method"], facts=len(u["request"]["facts"]))
        if u["version"] is not None:
            v = service.store.version(u["version"])
            out.update(status=v["status"], figures=v["figures"], gate=v["gate"], hash=v["weights_hash"],
                       bytes=v["bytes"])
        return out

    # ------------------------------------------------------------------ versions
    @app.get("/versions")
    def versions(model: str | None = None):
        service = pick(model)
        cur = service.current
        rows = []
        for v in service.store.versions():
            taught = v["taught"] or {}
            rows.append({"version": v["id"], "parent": v["parent"], "update": v["update_id"], "method": v["method"],
                         "delta": v["kind"], "hash": v["weights_hash"], "bytes": v["bytes"], "status": v["status"],
                         "taught": [f["statement"] for f in taught.get("facts", [])] if isinstance(taught, dict) else [],
                         "figures": {k: x for k, x in (v["figures"] or {}).items() if k != "answers"},
                         "gate": v["gate"], "who": v["who"], "created": v["created"], "served": v["id"] == cur.version})
        return {"model": service.name, "served": cur.info(), "versions": rows, "events": service.store.events()}

    def change(fn, *args):
        try:
            return fn(*args)
        except LookupError as e:
            raise ApiError(404, str(e).strip("'\""), code="not_found") from None
        except PermissionError as e:
            raise ApiError(409, str(e), code="conflict") from None
        except ForgetlessError as e:
            raise ApiError(409, str(e), code="conflict") from None

    @app.post("/promote")
    def promote(body: VersionRef, request: Request):
        by = who(request, write=True)
        service = pick(body.model)
        return {"model": service.name, "served": change(service.promote, body.version, by)}

    @app.post("/rollback")
    def rollback(request: Request, body: RollbackRequest | None = None):
        by = who(request, write=True)
        service = pick(body.model if body else None)
        t0 = time.time()
        served = change(service.rollback, body.version if body else None, by)
        return {"model": service.name, "served": served, "seconds": time.time() - t0}

    # ------------------------------------------------------------------ health and metrics
    @app.get("/health")
    def health(model: str | None = None):
        def one(s: Service) -> dict:
            return {**s.current.info(), "pending_updates": s.store.pending(), "requeued_at_start": s.requeued}

        service = pick(model)
        return {"status": "ok", "model": service.name, **one(service), "learning": cfg.token is not None,
                "models": {s.name: one(s) for s in listed}}

    @app.get("/metrics")
    def metrics():
        for s in listed:
            s._refresh_gauges()
        return PlainTextResponse(generate_latest(app_metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app
