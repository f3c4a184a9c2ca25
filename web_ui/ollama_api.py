"""Ollama's own API under /api/, so Open WebUI, the `ollama` clients and editor plugins work unchanged.

Routes: GET /api/version, /api/tags, /api/ps; POST /api/show, /api/chat, /api/generate, /api/embed
(and the older /api/embeddings). POST /api/chat is shared with Switchboard's own REST chat: a body
with `messages` is Ollama's (chat_api dispatches here), one with `content` is ours. Chats are
stateless and go through the same path into core as /v1 (ChatService.accept_stateless, the job
runner, the resource manager); answers stream as NDJSON (`stream: false`: one object). Model names
follow web_ui.ollama_shapes. Errors are Ollama's `{"error": "..."}` (web_ui.errors).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from core.chat import ChatJob
from core.errors import BadRequest, InternalError, ModelNotFound
from core.payloads import parse
from core.payloads_ollama import (
    OllamaChatRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
    format_output,
)
from core.types import Message, ModelInfo
from web_ui import ollama_shapes as shapes
from web_ui.errors import ollama_error_line
from web_ui.extensions import services
from web_ui.sinks import Collector, Failure
from web_ui.streaming import event_stream, first_events, guarded, start_job

log = logging.getLogger(__name__)

bp = Blueprint("ollama_api", __name__)

HEADER_WAIT_S = 10.0  # as /v1: an error before the first token is an HTTP error with its status
SURFACE = "ollama"


def is_ollama_chat(body: Any) -> bool:
    """Ollama's /api/chat body (it has `messages`); Switchboard's own has `content`."""
    return isinstance(body, dict) and "messages" in body and "content" not in body


# -- names -------------------------------------------------------------------------------------------
def _models() -> list[ModelInfo]:
    svc = services()
    return [m for m in svc.registry.known() if m.available] + [m for m in svc.embeddings.local_models() if m.available]


def resolve(name: str) -> ModelInfo:
    """The model an Ollama client names (Ollama name or Switchboard id); ModelNotFound otherwise."""
    wanted = shapes.name_key(name)
    for model in _models():
        if shapes.name_key(shapes.ollama_name(model.connection, model.native_name)) == wanted or model.id == name:
            return model
    svc = services()
    local = svc.embeddings.find_local(name)
    if local is not None:
        return local
    try:
        return svc.registry.resolve(name)[1]  # an exact id; a miss refreshes discovery once
    except ModelNotFound:
        pass
    for model in _models():  # discovery was refreshed: a model pulled just now is found
        if shapes.name_key(shapes.ollama_name(model.connection, model.native_name)) == wanted:
            return model
    raise ModelNotFound(f"model '{name}' not found")


def _name(model: ModelInfo) -> str:
    return shapes.ollama_name(model.connection, model.native_name)


# -- listing -----------------------------------------------------------------------------------------
@bp.get("/api/version")
def version():
    return jsonify({"version": shapes.OLLAMA_API_VERSION})


@bp.get("/api/tags")
def tags():
    return jsonify({"models": [shapes.tags_entry(m) for m in _models()]})


@bp.post("/api/show")
def show():
    g.api_surface = SURFACE
    body = parse(OllamaShowRequest, request.get_json(force=True, silent=True), "the request body")
    name = body.model or body.name
    if not name:
        raise BadRequest("model is required", param="model")
    return jsonify(shapes.show(resolve(name)))


@bp.get("/api/ps")
def ps():
    """What Switchboard holds now: loaded local engines and other runtimes' resident models."""
    status = services().resources.status()
    out = []
    for engine in status["engines"]:
        if engine["state"] != "loaded" or not engine["model"]:
            continue
        name = shapes.ollama_name("local", engine["model"])
        size = int(engine["bytes"] or 0)
        vram = size if str(engine.get("device") or "").startswith("cuda") else 0
        out.append(_ps_entry(name, size, vram, shapes.FOREVER))
    for key, runtime in status["runtimes"].items():
        for held in runtime.get("loaded", []):
            name = shapes.ollama_name(key, held["name"])
            out.append(
                _ps_entry(name, int(held.get("size") or 0), int(held.get("size_vram") or 0), held.get("expires_at"))
            )
    return jsonify({"models": out})


def _ps_entry(name: str, size: int, vram: int, expires: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "size": size,
        "size_vram": vram,
        "digest": "",
        "details": {"format": "", "family": "", "families": None},
        "expires_at": expires or shapes.FOREVER,
    }


# -- embeddings --------------------------------------------------------------------------------------
@bp.post("/api/embed")
def embed():
    g.api_surface = SURFACE
    body = parse(OllamaEmbedRequest, request.get_json(force=True, silent=True), "the request body")
    model = resolve(body.model)
    timer = _Timer()
    result = services().embeddings.embed(model.id, body.texts, reason="ollama_embed")
    return jsonify(
        {
            "model": _name(model),
            "embeddings": result.vectors,
            "total_duration": timer.ns(),
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


@bp.post("/api/embeddings")
def embeddings_legacy():
    g.api_surface = SURFACE
    body = parse(OllamaEmbedRequest, request.get_json(force=True, silent=True), "the request body")
    result = services().embeddings.embed(resolve(body.model).id, body.texts, reason="ollama_embed")
    return jsonify({"embedding": result.vectors[0]})


class _Timer:
    def __init__(self) -> None:
        import time

        self._time = time
        self.start = time.perf_counter()

    def ns(self) -> int:
        return int((self._time.perf_counter() - self.start) * 1e9)


# -- chat and generate -------------------------------------------------------------------------------
def chat(body: Any):
    """POST /api/chat in Ollama's shape (called by chat_api for bodies with `messages`)."""
    g.api_surface = SURFACE
    req = parse(OllamaChatRequest, body, "the request body")
    messages = req.to_messages()
    return _answer(req, messages, chat=True)


@bp.post("/api/generate")
def generate():
    g.api_surface = SURFACE
    req = parse(OllamaGenerateRequest, request.get_json(force=True, silent=True), "the request body")
    if req.images:
        raise BadRequest("images are not supported", param="images")
    messages = [Message("system", req.system)] if req.system else []
    if req.prompt:
        messages.append(Message("user", req.prompt))
    return _answer(req, messages, chat=False)


def _answer(req: Any, messages: list[Message], chat: bool):
    svc = services()
    model = resolve(req.model)
    name = _name(model)
    provider, model = svc.router.route(model.id)
    if not [m for m in messages if m.role != "system"]:  # Ollama's load / unload requests
        return _load_or_unload(provider, model, name, req.keep_alive, chat)
    defaults = svc.chat.default_options(None)
    options = req.options.to_options(defaults) if req.options else defaults
    options.output = format_output(req.format)
    options.tools = req.tool_list() if chat else None
    job = svc.chat.accept_stateless(model.id, messages, options)
    job.surface = SURFACE
    log.info("event=ollama_chat_accepted message=%s model=%s stream=%s", job.message_id, model.id, req.stream)
    writer = _Writer(job, name, chat, show_thinking=req.think is not False)
    if not req.stream:
        collector = Collector()
        svc.chat.run(job, collector)
        _keep_alive(provider, model, req.keep_alive)
        if collector.done is None:
            failure = collector.failure or Failure(InternalError("the answer never ended; see the server log"))
            raise failure.error
        return jsonify(writer.whole(collector))
    sink = start_job(svc.chat.runner, job)
    early, failure = first_events(sink, HEADER_WAIT_S)
    if failure is not None:
        raise failure.error

    def lines() -> Iterator[bytes]:
        yield from event_stream(sink, writer.render, early)
        _keep_alive(provider, model, req.keep_alive)

    return Response(guarded(job, lines(), "ollama"), mimetype="application/x-ndjson")


def _load_or_unload(provider: Any, model: ModelInfo, name: str, keep_alive: Any, chat: bool):
    resources = services().resources
    unload = _is_zero(keep_alive)
    if unload:
        resources.release(provider, model, "ollama_keep_alive_0")
    else:
        resources.prepare(provider, model, "ollama_load")
    obj = shapes.answer_object(name, chat, "", None, True)
    obj["done_reason"] = "unload" if unload else "load"
    return jsonify(obj)


def _is_zero(keep_alive: Any) -> bool:
    return keep_alive in (0, 0.0, "0", "0s", "0m", "0h")


def _keep_alive(provider: Any, model: ModelInfo, keep_alive: Any) -> None:
    """keep_alive 0 unloads the model once it answered; other values leave it to the resource manager's TTLs."""
    if _is_zero(keep_alive):
        services().resources.release(provider, model, "ollama_keep_alive_0")


class _Writer:
    """Turns a chat job's events into Ollama's NDJSON objects."""

    def __init__(self, job: ChatJob, name: str, chat: bool, show_thinking: bool) -> None:
        self.job, self.name, self.chat, self.show_thinking = job, name, chat, show_thinking

    def _line(self, obj: dict) -> bytes:
        return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def _final(self, content: str, thinking: str | None, done: dict) -> dict:
        obj = shapes.answer_object(self.name, self.chat, content, thinking, True)
        obj["done_reason"] = "length" if done.get("finish_reason") == "length" else "stop"
        obj.update(shapes.durations(self.job.timings, done.get("usage")))
        return obj

    def render(self, event: str, payload: Any) -> list[bytes]:
        if isinstance(payload, Failure):
            log.warning("event=ollama_stream_error message=%s code=%s", self.job.message_id, payload.error.code)
            return [self._line(ollama_error_line(payload.error))]
        if event == "delta":
            return [self._line(shapes.answer_object(self.name, self.chat, payload["content"], None, False))]
        if event == "reasoning" and self.show_thinking:
            return [self._line(shapes.answer_object(self.name, self.chat, "", payload["content"], False))]
        if event == "tool_calls" and self.chat:
            obj = shapes.answer_object(self.name, self.chat, "", None, False)
            obj["message"]["tool_calls"] = ollama_tool_calls(payload["tool_calls"])
            return [self._line(obj)]
        if event == "done":
            return [self._line(self._final("", None, payload))]
        return []

    def whole(self, collector: Collector) -> dict:
        thinking = "".join(collector.reasoning) if self.show_thinking else None
        obj = self._final("".join(collector.content), thinking or None, collector.done or {})
        if collector.tool_calls and self.chat:
            obj["message"]["tool_calls"] = ollama_tool_calls(collector.tool_calls)
        return obj


def ollama_tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI-shaped calls as Ollama sends them: arguments as an object, no id."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        out.append({"function": {"name": function.get("name"), "arguments": arguments}})
    return out
