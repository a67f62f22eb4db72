"""`matvlm serve`: an OpenAI-compatible HTTP server over the batching engine.

Endpoints: POST /v1/chat/completions (OpenAI message format; images as `image_url` parts with
`data:` URLs, or local paths when --allow-local-images; `stream: true` gives server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus text; this module needs the `serve` extra:
fastapi, uvicorn). Binds 127.0.0.1 unless told otherwise; an optional API key is checked
as `Authorization: Bearer KEY`. Bad requests get OpenAI-style JSON errors with a 4xx status and the
server keeps serving; requests and images are size-limited. Parameters this server cannot honour
(`n` > 1, `logprobs`, `tools`, ...) get a 400 naming them rather than being ignored; a full queue
gets a 429 with `Retry-After`; a client that disconnects frees its request's slot.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import Request, context_limit
from ..inputs.prompts import render, stop_strings
from ..engine.sampling import SamplingParams
from ..errors import MatvlmError
from .metrics import Metrics
from .service import QueueFull, Service


@dataclass
class Limits:
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_new_tokens: int = 2048


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": code, "param": param, "code": code}}


def decode_image(url: str, limits: Limits, allow_local: bool) -> Image.Image:
    """An image from a data: URL (or a local path when allowed), checked against the pixel limit."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError(400, "image data URLs must be base64 (data:image/...;base64,...)", "messages")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image_url is not valid base64", "messages") from None
        source = io.BytesIO(raw)
    elif allow_local and not url.startswith(("http://", "https://")):
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise RequestError(400, f"local image {path} does not exist", "messages")
        source = path
    else:
        raise RequestError(400, "image_url must be a data: URL" + (" or a local path" if allow_local else
                                                                    " (remote URLs are not fetched)"), "messages")
    try:
        with Image.open(source) as im:
            if im.width * im.height > limits.max_image_pixels:
                raise RequestError(413, f"image of {im.width}x{im.height} pixels exceeds the limit of "
                                        f"{limits.max_image_pixels} pixels", "messages", "image_too_large")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError(400, "image_url does not hold a readable image", "messages") from None


def parse_messages(body: dict, limits: Limits, allow_local: bool) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI messages -> ([{"role", "content": str}], images of the conversation, in order)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    out, images = [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    url = part.get("image_url", {})
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise RequestError(400, f"messages[{i}]: image_url needs a url", "messages")
                    images.append(decode_image(url, limits, allow_local))
                else:
                    raise RequestError(400, f"messages[{i}]: unsupported content part {kind!r}", "messages")
            text = "\n".join(parts)
        else:
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
        out.append({"role": m["role"], "content": text})
    if out[-1]["role"] != "user":
        raise RequestError(400, "the last message must be from the user", "messages")
    if len(images) > limits.max_images:
        raise RequestError(400, f"at most {limits.max_images} images per request, got {len(images)}", "messages")
    return out, images


# what a request may carry: parameters this server honours, and ones that change nothing here
SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "repetition_penalty", "seed", "stop", "stream", "stream_options", "ignore_eos"}
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# parameters accepted only at the value that asks for nothing this server lacks
NEUTRAL = {"n": lambda v: v == 1, "logprobs": lambda v: v is False,
           "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0,
           "logit_bias": lambda v: not v, "tools": lambda v: not v, "functions": lambda v: not v,
           "tool_choice": lambda v: v == "none", "function_call": lambda v: v == "none",
           "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
           "modalities": lambda v: v == ["text"]}


def check_parameters(body: dict) -> None:
    """400 naming every parameter the request sets that this server would otherwise silently ignore."""
    bad = sorted(k for k, v in body.items() if v is not None and k not in SUPPORTED | HARMLESS
                 and not (k in NEUTRAL and NEUTRAL[k](v)))
    if bad:
        listed = ", ".join(f"{k}={json.dumps(body[k])[:40]}" if k in NEUTRAL else k for k in bad)
        raise RequestError(400, f"unsupported parameter{'s' if len(bad) > 1 else ''}: {listed}; this server "
                                "generates one text choice per request (n=1) without logprobs, tools, penalties "
                                "other than repetition_penalty, or response formats other than text",
                           bad[0], "unsupported_parameter")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"include_usage"}):
        raise RequestError(400, "'stream_options' supports only {\"include_usage\": bool}", "stream_options",
                           "unsupported_parameter")


def sampling_from(body: dict, limits: Limits, stops: list[str]) -> SamplingParams:
    def num(name, default, kind=float):
        v = body.get(name, default)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise RequestError(400, f"'{name}' must be a number", name)
        return kind(v)

    max_tokens = num("max_completion_tokens", None, int) or num("max_tokens", 256, int)
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise RequestError(400, f"'max_tokens' must be in 1..{limits.max_new_tokens}", "max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of strings", "stop")
    seed = body.get("seed")
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=num("temperature", 1.0),
                              top_p=num("top_p", 1.0), top_k=num("top_k", 0, int),
                              repetition_penalty=num("repetition_penalty", 1.0),
                              seed=int(seed) if isinstance(seed, int) else None, stop=list(stop) + stops,
                              ignore_eos=body.get("ignore_eos") is True)
    except MatvlmError as e:
        raise RequestError(400, str(e)) from None


def create_app(service: Service, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
               allow_local_images: bool = False, template: str | None = None):
    app = FastAPI(title="matvlm", docs_url=None, redoc_url=None)
    engine = service.engine
    context = service.max_len
    stops = stop_strings(engine.processor, engine.model.config, template)
    metrics = Metrics(service)
    # requests are prepared on worker threads while the engine's thread decodes answers: they encode with a
    # copy of the processor, one at a time (fast tokenizers raise "Already borrowed" when one object encodes
    # in two threads at once, or encodes while another thread decodes)
    prep_processor, prep_lock = copy.deepcopy(engine.processor), threading.Lock()

    def fail(e: RequestError):
        return JSONResponse(error_body(e.message, e.code, e.param), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: HTTPRequest, exc: StarletteHTTPException):
        """Unknown paths and methods get the OpenAI error shape, not FastAPI's {"detail": ...}."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        message = {404: f"no endpoint {req.method} {req.url.path}; this server has POST /v1/chat/completions, "
                        "GET /v1/models and GET /health",
                   405: f"{req.url.path} does not take {req.method}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, code), status_code=exc.status_code, headers=exc.headers)

    def authorised(req: HTTPRequest) -> bool:
        return api_key is None or req.headers.get("authorization", "") == f"Bearer {api_key}"

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    def prometheus():
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models(req: HTTPRequest):
        if not authorised(req):
            return fail(RequestError(401, "invalid or missing API key", code="invalid_api_key"))
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "matvlm"}]}

    def prepare(body: dict) -> Request:
        """The request's checks, prompt and encoding: CPU work (images decoded and processed, the chat template,
        tokenising) run on a worker thread, so that the event loop keeps streaming other answers meanwhile."""
        if body.get("model", model_name) != model_name:
            raise RequestError(404, f"model {body.get('model')!r} does not exist; this server serves "
                                    f"{model_name!r}", "model", "model_not_found")
        check_parameters(body)
        messages, images = parse_messages(body, limits, allow_local_images)
        if images and not engine.vlm:
            raise RequestError(400, "this model takes no images", "messages")
        params = sampling_from(body, limits, stops)
        with prep_lock:
            prompt = render(prep_processor, engine.model.config, messages, len(images), template)
            request = Request(prompt, images, params)
            request.encoded = engine.encode(request, prep_processor)   # kept: the worker does not encode again
        n_prompt = len(request.encoded[0])
        if context and n_prompt + params.max_new_tokens > context:
            held = (f"the model's context of {context} tokens" if context == context_limit(engine.model) else
                    f"the {context} tokens a request may hold on this server (--max-len)")
            raise RequestError(400, f"prompt of {n_prompt} tokens + max_tokens {params.max_new_tokens} exceeds "
                                    f"{held}", "messages", "context_length_exceeded")
        return request

    @app.post("/v1/chat/completions")
    async def chat(req: HTTPRequest):
        try:
            if not authorised(req):
                raise RequestError(401, "invalid or missing API key", code="invalid_api_key")
            kind = req.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise RequestError(415, f"Content-Type must be application/json, got {kind or 'none'}",
                                   code="unsupported_media_type")
            raw = await req.body()
            if len(raw) > limits.max_body_bytes:
                raise RequestError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError(400, "request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise RequestError(400, "request body must be a JSON object")
            request = await run_in_threadpool(prepare, body)
        except RequestError as e:
            return fail(e)
        try:
            handle = service.submit(request)
        except QueueFull as e:
            return JSONResponse(error_body(str(e), "rate_limit_exceeded"), status_code=429,
                                headers={"Retry-After": "1"})
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": model_name}
        if body.get("stream"):
            usage_chunk = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events():
                chunk = {**base, "object": "chat.completion.chunk"}
                extra = {"usage": None} if usage_chunk else {}
                try:
                    yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}], **extra})
                    async for piece in handle.astream():      # no worker thread held while waiting
                        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                                          "finish_reason": None}], **extra})
                    out = handle.output
                    yield _sse({**chunk, "choices": [{"index": 0, "delta": {},
                                                      "finish_reason": out.finish_reason}], **extra})
                    if usage_chunk:
                        yield _sse({**chunk, "choices": [], "usage": _usage(out)})
                except Exception as e:             # noqa: BLE001 - the stream reports it and ends
                    yield _sse(error_body(str(e), "server_error"))
                finally:                           # also when the client went away (cancellation)
                    handle.cancel()
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            out = await _result_unless_gone(handle, req)
        except Exception as e:                     # noqa: BLE001
            return JSONResponse(error_body(str(e), "server_error"), status_code=500)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": out.finish_reason}],
                "usage": _usage(out)}

    return app


async def _result_unless_gone(handle, req: HTTPRequest):
    """The request's output; if the client disconnects first, the request is cancelled (its slot freed)."""
    try:
        return await handle.aresult(req.is_disconnected)
    finally:
        handle.cancel()


def _usage(out) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids),
            "total_tokens": out.prompt_tokens + len(out.token_ids)}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@contextmanager
def serving(app, host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 30.0):
    """Run `app` under uvicorn in a background thread (on a free port unless `port`); yields its base URL
    (http://host:port) once it accepts connections, and stops it on exit."""
    import socket
    import threading

    import uvicorn

    if port is None:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="matvlm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise MatvlmError(f"the HTTP server on {host}:{port} did not start within {start_timeout_s:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
