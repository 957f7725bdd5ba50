"""HTTP only: routes, auth, body limits, OpenAI-shaped errors and server-sent events.

The model work is the engine's; the adapters' files are ``adapters``' business; this module
turns requests into ``GenRequest``s and events back into responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.config import LoraforgeConfig
from loraforge.errors import AdapterError
from loraforge.serve import protocol as p
from loraforge.serve.adapters import AdapterInfo, confined, load_adapter_info
from loraforge.serve.engine import EngineBase, GenRequest, QueueFull, RequestTooLong, create_engine
from loraforge.serve.metrics import ServeMetrics

log = logging.getLogger("loraforge.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers or {}


class ServerState:
    """What the routes share: the engine, the adapters, readiness."""

    def __init__(self, config: LoraforgeConfig):
        self.config = config
        self.cfg = config.serve
        self.api_key = self.cfg.api_key or os.environ.get("LORAFORGE_API_KEY")
        self.admin_key = self.cfg.admin_key or os.environ.get("LORAFORGE_ADMIN_KEY")
        self.metrics = ServeMetrics()
        self.ready = False
        self.load_error: str | None = None
        self.adapters: dict[str, AdapterInfo] = {}
        self.engine: EngineBase | None = None
        self.model_name = config.model.name

    # ---- loading -------------------------------------------------------------------------

    def load(self) -> None:
        """Load the base model and the configured adapters, warm up, then declare ready."""
        try:
            import torch

            from loraforge.models import load_causal_lm, load_tokenizer

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if (device.type == "cuda" and self.cfg.dtype != "fp32") else torch.float32
            self.tokenizer = load_tokenizer(self.model_name)
            model = load_causal_lm(self.model_name, dtype=dtype).to(device).eval()
            self.engine = create_engine(self.cfg, model, self.tokenizer, device, self.metrics)
            self.metrics.queue_capacity.set(self.cfg.max_queue)
            for name, source in self.cfg.adapters.items():
                self.add_adapter(name, source)
            self.engine.start()
            self._warm_up()
            self.ready = True
            log.info("ready: model %s, adapters %s", self.model_name, sorted(self.adapters) or "none")
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading failed")

    def _warm_up(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            prompt = self.tokenizer("Hello", add_special_tokens=True)["input_ids"]
            self.engine.run_batch([self._request(prompt, None, 2, 0.0, 1.0, None, [], self.tokenizer, loop)])
        finally:
            loop.close()

    def add_adapter(self, name: str, source) -> AdapterInfo:
        if name in self.adapters or name == self.model_name:
            raise ApiError(409, f"a model named {name!r} is already loaded", param="name")
        info = load_adapter_info(name, source, self.tokenizer)
        self.engine.add_adapter(name, info.path)
        self.adapters[name] = info
        self.metrics.adapters_loaded.set(len(self.adapters))
        log.info("adapter %s loaded from %s%s", name, info.path, "" if info.template_matches_base else " (its own chat template)")
        return info

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ApiError(404, f"no adapter named {name!r}", "not_found_error", param="name")
        self.engine.remove_adapter(name)
        del self.adapters[name]
        self.metrics.adapters_loaded.set(len(self.adapters))

    # ---- requests ------------------------------------------------------------------------

    def resolve(self, model: str) -> tuple[str | None, object]:
        if model == self.model_name or model == "base":
            return None, self.tokenizer
        if model in self.adapters:
            return model, self.adapters[model].tokenizer
        known = [self.model_name, *sorted(self.adapters)]
        raise ApiError(404, f"model {model!r} not found; available: {', '.join(known)}", "not_found_error", param="model")

    def _request(self, prompt_ids, adapter, max_tokens, temperature, top_p, seed, stops, tokenizer, loop) -> GenRequest:
        return GenRequest(prompt_ids, adapter, max_tokens, temperature, top_p, seed, stops, tokenizer, loop)


def create_app(config: LoraforgeConfig, load_in_background: bool = True) -> FastAPI:
    state = ServerState(config)
    app = FastAPI(title="loraforge", version="0.1.0", description="OpenAI-compatible serving of a base model and LoRA adapters.")
    app.state.lf = state

    @app.on_event("startup")
    async def _startup() -> None:  # the server answers /health and /ready (503) while loading
        if load_in_background:
            threading.Thread(target=state.load, name="loraforge-load", daemon=True).start()
        else:
            state.load()

    # ---- cross-cutting: auth, body size, errors -------------------------------------------

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > state.cfg.max_body_bytes:
            return _error(413, f"request body over {state.cfg.max_body_bytes} bytes", "invalid_request_error")
        if path != "/health" and state.api_key and not path.startswith("/v1/adapters"):
            if request.headers.get("authorization") != f"Bearer {state.api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        response = await call_next(request)
        if path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            model = getattr(request.state, "model", "unknown")
            state.metrics.request_duration.labels(model, path, str(response.status_code)).observe(time.perf_counter() - started)
            state.metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in first["loc"] if x != "body")
        return _error(400, f"{param}: {first['msg']}" if param else first["msg"], "invalid_request_error", param or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    def require_ready() -> None:
        if not state.ready:
            why = f"loading failed: {state.load_error}" if state.load_error else "the model is still loading"
            raise ApiError(503, f"not ready: {why}", "service_unavailable", headers={"Retry-After": "5"})

    # ---- probes and listings --------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        require_ready()
        return {"status": "ready", "model": state.model_name, "adapters": sorted(state.adapters)}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        entries = [{"id": state.model_name, "object": "model", "created": p.now(), "owned_by": "loraforge"}]
        entries += [{"id": n, "object": "model", "created": p.now(), "owned_by": "loraforge", "parent": state.model_name} for n in sorted(state.adapters)]
        return {"object": "list", "data": entries}

    # ---- generation ----------------------------------------------------------------------

    async def generate(request: Request, body, prompt_ids: list[int], adapter, tokenizer, max_tokens: int, stops, on_stream):
        request.state.model = body_model = adapter or state.model_name
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty: it has no tokens", param="prompt")
        loop = asyncio.get_running_loop()
        temperature = getattr(body, "temperature", 1.0)
        gen = state._request(prompt_ids, adapter, max_tokens, temperature, getattr(body, "top_p", 1.0), getattr(body, "seed", None), stops, tokenizer, loop)
        try:
            state.engine.submit(gen)
        except QueueFull:
            raise ApiError(429, "the server is at capacity; retry later", "rate_limit_error", headers={"Retry-After": "1"}) from None
        except RequestTooLong as exc:
            raise ApiError(400, str(exc), param="max_tokens") from None
        state.metrics.prompt_tokens.labels(body_model).inc(len(prompt_ids))
        return gen

    def record_done(gen: GenRequest, model: str) -> None:
        m = state.metrics
        m.generated_tokens.labels(model).inc(len(gen.generated))
        if gen.first_token_at is not None:
            m.ttft.labels(model).observe(gen.first_token_at - gen.created)
            if len(gen.generated) > 1:
                m.tpot.labels(model).observe((time.perf_counter() - gen.first_token_at) / (len(gen.generated) - 1))

    async def collect(gen: GenRequest, request: Request) -> str:
        deadline = state.cfg.request_timeout_s
        try:
            async with asyncio.timeout(deadline):
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(gen.events.get(), 0.5)
                    except TimeoutError:
                        if await request.is_disconnected():
                            gen.cancelled.set()
                            raise ApiError(499, "client disconnected", "cancelled") from None
                        continue
                    if kind == "error":
                        raise ApiError(500, payload, "server_error")
                    if kind == "done":
                        return payload
        except TimeoutError:
            gen.cancelled.set()
            raise ApiError(504, f"generation did not finish within {deadline:g} s", "timeout_error") from None

    def check_body(body) -> int:
        ignored = body.ignored_fields() if hasattr(body, "ignored_fields") else sorted(body.model_extra or {})
        if ignored:
            log.info("ignored request fields: %s", ", ".join(ignored))
        max_tokens = body.max_tokens if body.max_tokens is not None else min(256, state.cfg.max_tokens_limit)
        if max_tokens > state.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit {state.cfg.max_tokens_limit}", param="max_tokens")
        return max_tokens

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: p.ChatCompletionRequest):
        require_ready()
        max_tokens = check_body(body)
        adapter, tokenizer = state.resolve(body.model)
        messages = [m.model_dump() for m in body.messages]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        gen = await generate(request, body, prompt_ids, adapter, tokenizer, max_tokens, body.stops(), None)
        rid, created = p.new_id("chatcmpl"), p.now()
        if body.stream:
            def chunk(delta: dict, finish=None, usage=None):
                data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                if usage:
                    data["usage"] = usage
                return data
            return stream_response(gen, body.model, chunk, first={"role": "assistant", "content": ""}, text_key="content")
        finish = await collect(gen, request)
        record_done(gen, body.model)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": _finish(finish)}],
            "usage": usage_of(gen),
        }

    @app.post("/v1/completions")
    async def completions(request: Request, body: p.CompletionRequest):
        require_ready()
        max_tokens = check_body(body)
        adapter, tokenizer = state.resolve(body.model)
        prompt_ids = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        gen = await generate(request, body, prompt_ids, adapter, tokenizer, max_tokens, body.stops(), None)
        rid, created = p.new_id("cmpl"), p.now()
        if body.stream:
            def chunk(delta: dict, finish=None, usage=None):
                data = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [{"index": 0, "text": delta.get("text", ""), "finish_reason": finish}]}
                if usage:
                    data["usage"] = usage
                return data
            return stream_response(gen, body.model, chunk, first=None, text_key="text")
        finish = await collect(gen, request)
        record_done(gen, body.model)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "text": gen.text, "finish_reason": _finish(finish)}],
            "usage": usage_of(gen),
        }

    @app.post("/generate")
    async def simple_generate(request: Request, body: p.GenerateRequest):
        require_ready()
        max_tokens = check_body(body)
        model = body.adapter or state.model_name
        adapter, tokenizer = state.resolve(model)
        prompt_ids = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        gen = await generate(request, body, prompt_ids, adapter, tokenizer, max_tokens, [], None)
        await collect(gen, request)
        record_done(gen, model)
        return {"generated_text": gen.text, "model": model, "usage": usage_of(gen)}

    def usage_of(gen: GenRequest) -> dict:
        return {"prompt_tokens": len(gen.prompt_ids), "completion_tokens": len(gen.generated), "total_tokens": len(gen.prompt_ids) + len(gen.generated)}

    def stream_response(gen: GenRequest, model: str, chunk, first, text_key: str):
        async def events():
            try:
                if first is not None:
                    yield _sse(chunk(first))
                async with asyncio.timeout(state.cfg.request_timeout_s):
                    while True:
                        kind, payload = await gen.events.get()
                        if kind == "delta":
                            yield _sse(chunk({text_key: payload}))
                        elif kind == "error":
                            yield _sse(p.error_body(payload, "server_error", 500))
                            break
                        else:
                            record_done(gen, model)
                            yield _sse(chunk({}, _finish(payload), usage_of(gen)))
                            break
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, TimeoutError):
                gen.cancelled.set()  # the client went away (or the deadline passed): stop generating
                raise
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- adapters while serving ------------------------------------------------------------

    def require_admin(request: Request) -> None:
        if not state.admin_key:
            raise ApiError(403, "adapter loading while serving is off: start the server with an admin key", "permission_error")
        if request.headers.get("authorization") != f"Bearer {state.admin_key}":
            raise ApiError(401, "missing or wrong admin key", "authentication_error")

    @app.post("/v1/adapters")
    async def load_adapter(request: Request, body: dict):
        require_admin(request)
        require_ready()
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "give 'name' and 'path' (relative to the adapter root)", param="name")
        if state.cfg.adapter_root is None:
            raise ApiError(403, "no adapter root configured: loading while serving is off", "permission_error")
        try:
            target = confined(Path(state.cfg.adapter_root), path)
            info = await asyncio.to_thread(state.add_adapter, name, target)
        except AdapterError as exc:
            raise ApiError(400, str(exc), param="path") from None
        return {"name": name, "loaded": True, "template_matches_base": info.template_matches_base}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str):
        require_admin(request)
        require_ready()
        await asyncio.to_thread(state.remove_adapter, name)
        return {"name": name, "loaded": False}

    return app


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, reason)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error(status: int, message: str, type_: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, type_, status, param), status_code=status, headers=headers)


def serve(config: LoraforgeConfig) -> None:
    import uvicorn

    cfg = config.serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = cfg.api_key or os.environ.get("LORAFORGE_API_KEY")
    log.info("loraforge serve: model %s, adapters %s, http://%s:%d, authentication %s",
             config.model.name, sorted(cfg.adapters) or "none", cfg.host, cfg.port, "on" if api_key else "OFF")
    uvicorn.run(create_app(config), host=cfg.host, port=cfg.port, log_level="info")
