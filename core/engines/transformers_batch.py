"""Several streams of one transformers model generated together: transformers' continuous-batching manager.

transformers 5.x ships a manager (`model.init_continuous_batching`) that keeps a paged KV cache and
a background loop adding and retiring requests between steps. This wraps it for the chat engine:
each stream is one request with its own sampling (per-request temperature, top_p; greedy as
top_k = 1), streamed back token by token through a result handler that runs in the manager's
thread and hands decoded text to the stream's `emit`. Stop strings are found in the text here, and
the request is cancelled when one appears or `stop` is pressed (checked every 50 ms).

Measured on 2 cores with SmolLM2-135M bf16: eight streams at once gave several times one stream's
tokens/s in total (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

from core.concurrency import os_event, os_lock, use_real_threads_in
from core.engines.sampling import TextAssembler
from core.errors import GenerationFailed
from core.types import CancelToken, ChatOptions, StreamResult

log = logging.getLogger(__name__)

PAGE_SIZE = 256  # tokens per KV page (transformers' default)
CANCEL_POLL_S = 0.05  # how often a waiting stream looks at its stop flag


class _Inline:
    """Stands in for the asyncio loop transformers hands results to: runs the handler at once, in its thread."""

    @staticmethod
    def call_soon_threadsafe(callback: Callable[..., Any], *args: Any) -> None:
        callback(*args)


class ContinuousBatcher:
    """The continuous-batching manager of one loaded model, serving up to `max_parallel` streams at once."""

    def __init__(self, model: Any, tokenizer: Any, max_parallel: int, context_tokens: int) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching import continuous_api, scheduler, utils

        use_real_threads_in(continuous_api, scheduler, utils)  # its loop thread must be a real one
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        # Processors exist only for values set here; each request then brings its own values.
        config = GenerationConfig(
            do_sample=True,
            temperature=0.7,
            top_p=0.95,
            top_k=50,
            max_new_tokens=512,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id or eos,
        )
        batching = ContinuousBatchingConfig(
            per_request_processors=True,
            page_size=PAGE_SIZE,
            num_blocks=max(4, math.ceil(context_tokens * max_parallel / PAGE_SIZE)),
            max_batch_tokens=512,
            max_requests_per_batch=max_parallel,
            # A prompt's KV is computed for it alone: KV shared from another request's batch differs in the
            # last bits (bf16), and greedy answers would then depend on who asked before.
            allow_block_sharing=False,
        )
        self._model, self._config, self._batching = model, config, batching
        self._lock = os_lock()
        self.manager = self._start()

    def _start(self) -> Any:
        manager = self._model.init_continuous_batching(
            generation_config=self._config, continuous_batching_config=self._batching
        )
        manager.start()
        return manager

    def _alive(self) -> Any:
        """The running manager; a new one when the last died (a step that fails ends its loop for good)."""
        with self._lock:
            if not self.manager.is_running():
                log.warning("event=batching_restart reason=%s", self.manager.background_thread_status.fatal_error)
                try:
                    self.manager.stop(block=True, timeout=5)
                except Exception:
                    log.debug("event=batching_stop_failed", exc_info=True)
                self.manager = self._start()
            return self.manager

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)

    def generate(
        self,
        prompt: list[int],
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
        emit: Callable[[str], None],
    ) -> None:
        """Generate one stream among the others; blocks the calling (OS) thread until it ends."""
        request_id = uuid.uuid4().hex
        done = os_event()
        state = {"tokens": [], "shown": "", "stopped": False, "error": None, "finished": False}
        text = TextAssembler(options.stop)
        eos = self.tokenizer.eos_token_id

        manager = self._alive()

        def on_output(output: Any) -> None:  # the manager's thread
            if state["stopped"]:
                return
            tokens = [t for t in output.generated_tokens if t != eos]
            decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not decoded.endswith("\ufffd"):  # wait for the rest of a split character
                new, state["shown"] = decoded[len(state["shown"]) :], decoded
                piece, stopped = text.feed(new.encode())
                if piece:
                    emit(piece)
                if stopped:
                    state["stopped"] = True
                    manager.cancel_request(request_id)
            state["tokens"] = list(output.generated_tokens)
            if output.error:
                state["error"] = output.error
            if output.is_finished() or state["stopped"]:
                state["finished"] = True
                done.set()

        with manager.output_router._lock:
            manager.output_router.result_handlers[request_id] = (on_output, _Inline())
        sampling: dict[str, Any] = (
            {"top_k": 1}
            if options.temperature <= 0
            else {"temperature": float(options.temperature), "top_p": float(options.top_p), "top_k": self.vocab_size}
        )
        try:
            accepted = manager.add_request(
                prompt, request_id=request_id, max_new_tokens=options.max_new_tokens, streaming=True, **sampling
            )
            if accepted is None:
                raise GenerationFailed("the local model's batching loop refused the request; try again")
            while not done.wait(CANCEL_POLL_S):
                if cancel.is_set():
                    manager.cancel_request(request_id)
                    done.wait(2.0)
                    break
                if not manager.is_running():  # a step failed: every request in it is lost
                    fatal = manager.background_thread_status.fatal_error
                    state["error"] = state["error"] or str(fatal or "the batching loop stopped")
                    break
        finally:
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(request_id, None)
        if state["error"] and not cancel.is_set():
            raise GenerationFailed(f"the local model failed while generating: {state['error']}")
        if not state["stopped"]:
            held = text.finish()
            if held:
                emit(held)
        produced = len(state["tokens"])
        result.usage.prompt_tokens = len(prompt)
        result.usage.completion_tokens = produced
        if cancel.is_set():
            result.finish_reason = "cancelled"
        elif state["stopped"] or (state["tokens"] and state["tokens"][-1] == eos):
            result.finish_reason = "stop"
        else:
            result.finish_reason = "length" if produced >= options.max_new_tokens else "stop"
