"""The llama.cpp chat engine: a GGUF model run in-process by llama-cpp-python, several streams at once.

The Engine base owns states, locking and memory accounting; this file says how to open the model
and its context (`load_weights`), how to close them (`release_weights`), and how to answer
(`generate_to`: render the GGUF's own chat template, tokenize, and hand the stream to the context's
BatchLoop, which generates it together with the others).

The context has `max_parallel` sequences of `context_tokens` each; KV memory is the price of
parallel streams (SmolLM2-135M: ~23 KB per token and stream in f16).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.engines.base import Engine
from core.engines.grammar import GrammarConstraint, grammar_for
from core.engines.llama_batch import BatchLoop, Stream
from core.engines.sampling import Sampler, TextAssembler
from core.errors import GenerationFailed, ModelUnavailable, TooLong
from core.resources.estimate import Estimate, gguf_metadata, gguf_shape, kv_bytes, overhead
from core.resources.memory import cuda_available
from core.types import CancelToken, ChatOptions, Message, StreamResult

log = logging.getLogger(__name__)

KV_BYTES = 2  # f16 keys and values (llama.cpp's default cache type)
#: What Ollama and llama.cpp's OpenAI-compatible servers use by default. Quantized small models loop
#: without it (SmolLM2 Q4_1, greedy: "la femme au martyre, la femme au martyre...").
DEFAULT_REPEAT_PENALTY = 1.1


def llama_cpp_available() -> bool:
    """True when llama-cpp-python can be imported (it is installed from a cached build)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class LlamaHandles:
    """What one loaded GGUF holds: the model, its context, and the loop that generates with it."""

    lib: Any
    model: Any
    ctx: Any
    vocab: Any
    loop: BatchLoop
    template: Any  # a chat formatter built from the GGUF's tokenizer.chat_template
    kv_bytes: int


class LlamaCppChatEngine(Engine):
    """One local GGUF chat model served by llama.cpp, up to `max_parallel` streams decoded together."""

    role = "chat"
    runtime = "llama.cpp"

    def __init__(
        self,
        model_id: str,
        gguf: Path,
        device_preference: str = "auto",
        max_parallel: int = 4,
        context_tokens: int = 4096,
        threads: int = 0,
    ) -> None:
        super().__init__(model_id, gguf, device_preference)
        self.max_parallel = max(1, max_parallel)
        self.context_tokens = max(256, context_tokens)
        self.threads = threads or os.cpu_count() or 1
        self.dtype = "gguf"

    def prepare_runtime(self) -> None:
        import llama_cpp

        llama_cpp.llama_backend_init()

    # -- the Engine's part ---------------------------------------------------------------------------
    def estimate(self) -> Estimate:
        """The GGUF's tensor data, plus the unified KV cache this engine allocates at load."""
        device = "cuda" if self.device_preference != "cpu" and cuda_available() else "cpu"
        weights = self.path.stat().st_size if self.path is not None and self.path.is_file() else 0
        kv, context = 0, self.context_tokens
        if weights:
            meta = gguf_metadata(self.path)
            trained = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", 0) or context)
            context = min(context, trained)
            layers, kv_heads, head_dim = gguf_shape(self.path)
            kv = kv_bytes(layers, kv_heads, head_dim, context * self.max_parallel, KV_BYTES)
        return Estimate(
            self.model_id,
            self.runtime,
            device,
            "gguf",
            context,
            self.max_parallel,
            weights,
            kv,
            overhead(self.runtime, weights, device),
        )

    def check_files(self) -> None:
        if self.path is None or not self.path.is_file():
            raise ModelUnavailable(f"{self.model_id}: the GGUF file is missing ({self.path})")
        if not llama_cpp_available():
            raise ModelUnavailable("llama-cpp-python is not installed: run `make run` (it installs the cached build)")

    def choose_device(self) -> tuple[str, str]:
        import llama_cpp

        wants_gpu = self.device_preference.startswith("cuda") or self.device_preference == "auto"
        device = "cuda" if wants_gpu and llama_cpp.llama_supports_gpu_offload() else "cpu"
        return device, "gguf"

    def load_weights(self, device: str, dtype: str) -> LlamaHandles:
        import llama_cpp as lib
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = -1 if device == "cuda" else 0
        model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise ModelUnavailable(f"llama.cpp could not load {self.path}")
        try:
            ctx_params = lib.llama_context_default_params()
            n_ctx_seq = min(self.context_tokens, lib.llama_model_n_ctx_train(model) or self.context_tokens)
            ctx_params.n_seq_max = self.max_parallel
            ctx_params.n_ctx = n_ctx_seq * self.max_parallel
            ctx_params.kv_unified = True  # one cache all sequences share: prompt prefixes are copied between them
            ctx_params.n_batch = ctx_params.n_ubatch = 512
            ctx_params.n_threads = ctx_params.n_threads_batch = self.threads
            ctx = lib.llama_init_from_model(model, ctx_params)
            if not ctx:
                raise ModelUnavailable(f"llama.cpp could not create a context of {ctx_params.n_ctx} tokens")
        except BaseException:
            lib.llama_model_free(model)
            raise
        vocab = lib.llama_model_get_vocab(model)
        template = lib.llama_model_chat_template(model, None)
        formatter = Jinja2ChatFormatter(
            template=(template or b"").decode() or _FALLBACK_TEMPLATE,
            eos_token=_piece(lib, vocab, lib.llama_vocab_eos(vocab)),
            bos_token=_piece(lib, vocab, lib.llama_vocab_bos(vocab)),
        )
        self.context_tokens = n_ctx_seq
        loop = BatchLoop(
            lib, ctx, vocab, self.max_parallel, ctx_params.n_batch, n_ctx_seq, name=f"llama-{Path(self.model_id).name}"
        )
        return LlamaHandles(lib, model, ctx, vocab, loop, formatter, _kv_bytes(lib, model, ctx_params.n_ctx))

    def release_weights(self, weights: LlamaHandles) -> None:
        weights.loop.close()
        weights.lib.llama_free(weights.ctx)
        weights.lib.llama_model_free(weights.model)

    def weights_bytes(self, weights: LlamaHandles) -> int:
        return int(weights.lib.llama_model_size(weights.model)) + weights.kv_bytes

    # -- its own work ----------------------------------------------------------------------------------
    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """The messages rendered with the GGUF's chat template (ready for an answer) as token ids."""
        weights = self.weights_for_use()
        prompt = weights.template(messages=[m.to_dict() for m in messages]).prompt
        return _tokenize(weights.lib, weights.vocab, prompt)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.prompt_tokens(messages))

    def generate_to(
        self,
        messages: list[Message],
        options: ChatOptions,
        cancel: CancelToken,
        result: StreamResult,
        emit: Callable[[str], None],
    ) -> None:
        """Generate in the context's loop, together with other streams; blocks the calling thread until done."""
        weights = self.weights_for_use()
        prompt = self.prompt_tokens(messages)
        if len(prompt) >= self.context_tokens:
            raise TooLong(f"the prompt is {len(prompt)} tokens; {self.model_id} has {self.context_tokens} per stream")
        penalty = options.repeat_penalty
        if penalty is None:  # JSON repeats quotes, braces and keys by design: no default penalty under a grammar
            penalty = 1.0 if options.output is not None else DEFAULT_REPEAT_PENALTY
        constraint = None
        if options.output is not None:
            constraint = GrammarConstraint(weights.lib, weights.vocab, grammar_for(options.output))
        sampler = Sampler(options.temperature, options.top_p, penalty, constraint=constraint)
        stream = Stream(prompt, options.max_new_tokens, sampler, TextAssembler(options.stop), cancel, emit, result)
        weights.loop.submit(stream)
        stream.done.wait()
        if stream.error is not None:
            log.error("event=generation_failed model=%s error=%s", self.model_id, stream.error.message)
            raise stream.error


# SmolLM2 and most recent instruct GGUFs carry their template; this ChatML one is for those that do not.
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _piece(lib: Any, vocab: Any, token: int) -> str:
    if token < 0:
        return ""
    buf = ctypes.create_string_buffer(64)
    size = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[: max(size, 0)].decode(errors="replace")


def _tokenize(lib: Any, vocab: Any, text: str) -> list[int]:
    """Token ids of an already templated prompt (special tokens parsed; no BOS added: templates add it)."""
    data = text.encode()
    room = len(data) + 16
    buf = (lib.llama_token * room)()
    count = lib.llama_tokenize(vocab, data, len(data), buf, room, False, True)
    if count < 0:
        raise GenerationFailed(f"llama.cpp could not tokenize the prompt ({count})")
    return list(buf[:count])


def _kv_bytes(lib: Any, model: Any, n_ctx: int) -> int:
    """KV cache bytes of a context: layers x context x (keys + values) x kv heads x head size x bytes."""
    n_head = max(lib.llama_model_n_head(model), 1)
    head_dim = lib.llama_model_n_embd(model) // n_head
    return lib.llama_model_n_layer(model) * n_ctx * 2 * lib.llama_model_n_head_kv(model) * head_dim * KV_BYTES
