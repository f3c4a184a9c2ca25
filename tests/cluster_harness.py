"""Real services for the scale-out tests: Debian's redis-server and nginx, the stream peer, and a
group of Switchboard processes sharing them (PostgreSQL comes from tests/pg_server.py).

Each starter returns an object with `.stop()`; nothing here mocks a part Switchboard talks to.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT, ServerProcess, free_port

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PEER = ROOT / "tests" / "peers" / "stream_peer.py"


def _need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if not path:
        raise RuntimeError(f"{binary} is not installed: `make test` installs it (Makefile target `services`)")
    return path


class RedisServer:
    """Debian's redis-server on a free loopback port, without persistence."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                _need("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        self.client = client

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def render_nginx_conf(backends: list[str], port: int, workdir: Path) -> Path:
    """deploy/nginx.conf with its upstream servers and listen port pointed at this machine's processes."""
    text = NGINX_CONF.read_text()
    lines, replaced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*server\s+\S+:\d+", line):
            if not replaced:
                indent = line[: len(line) - len(line.lstrip())]
                lines += [f"{indent}server {b};" for b in backends]
                replaced = True
            continue
        lines.append(line)
    text = "\n".join(lines) + "\n"
    text, listens = re.subn(r"listen\s+80\s*;", f"listen 127.0.0.1:{port};", text)
    assert replaced and listens == 1, "deploy/nginx.conf: one upstream block and one `listen 80;` expected"
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


class NginxProxy:
    """Debian's nginx in front of `backends` ("127.0.0.1:port"), with the deployment's own config."""

    def __init__(self, workdir: Path, backends: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        conf = render_nginx_conf(backends, self.port, workdir)
        self.log_path = workdir / "nginx.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                _need("nginx"),
                "-c",
                str(conf),
                "-p",
                str(workdir),
                "-e",
                str(self.log_path),
                "-g",
                f"daemon off; pid {workdir}/nginx.pid;",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(self.url + "/healthz", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"nginx did not start: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


class StreamPeer:
    """tests/peers/stream_peer.py as its own process (a test may kill it)."""

    def __init__(self, delay: float = 0.0, port: int = 0, stamp: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), "--port", str(port), "--delay", str(delay), *(["--stamp"] if stamp else [])],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY"):
            raise RuntimeError(f"stream peer did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[dict]:
        return requests.get(f"http://127.0.0.1:{self.port}/_test/log", timeout=5).json()["requests"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def peer_config(peer_url: str, key: str = "peer") -> str:
    """A config.toml naming the stream peer as an OpenAI-compatible connection."""
    return f'[model_names.{key}]\nbase_url = "{peer_url}"\nmodels = ["counter"]\n'


def start_group(
    root: Path, model_dir: Path, count: int, env: dict[str, str], config: str = "", timeout: float = 90
) -> list[ServerProcess]:
    """`count` Switchboard processes with their own data dirs, one config and the shared `env`."""
    config_path = root / "config.toml"
    config_path.write_text(config)
    procs = []
    for i in range(count):
        proc = ServerProcess(root / f"data-{i}", model_dir, env={"SWITCHBOARD_CONFIG": str(config_path), **env})
        procs.append(proc)
    # The first one alone: it creates the database schema; then the rest in parallel.
    procs[0].start(timeout)
    for proc in procs[1:]:
        proc.start(timeout)
    return procs


def kill_hard(proc: ServerProcess) -> None:
    """kill -9: no shutdown code runs, as in a crash."""
    if proc.proc and proc.proc.poll() is None:
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """Debian's redis-server for a test module (tests flush it: see each module's env fixture)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def cluster_env(redis_server: RedisServer, postgres_url: str) -> dict[str, str]:
    """An empty Redis and a fresh PostgreSQL database (tests/pg_server.py) for each test: the
    environment of a group of processes sharing state."""
    redis_server.client.flushall()
    return {"SWITCHBOARD_REDIS_URL": redis_server.url, "SWITCHBOARD_DATABASE_URL": postgres_url}
