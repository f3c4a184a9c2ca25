"""A throwaway PostgreSQL server for tests: Debian's binaries, a temp cluster, a free port.

`start_postgres(tmp_dir) -> (url, stop)` starts one server (`launch_postgres` also tells its socket
directory and can turn TLS on); the session fixture `postgres_server`
starts it once, and `postgres_url` gives each test a fresh database on it (CREATE DATABASE), so
tests (and the multi-process tests that reuse it) never see each other's rows. PostgreSQL refuses
to run as root, so the cluster directory belongs to the `postgres` user and the server runs as it.
Where PostgreSQL is not installed the fixture fails with how to install it (`make services`).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "PostgreSQL is not installed: run `make services` (apt-get install postgresql)"
USER = "switchboard"


def pg_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb; fails clearly when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError(INSTALL_HINT)
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args: list[str]) -> list[str]:
    """Run as the `postgres` user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class PgServer:
    url: str  # database `postgres` as user `switchboard` over TCP, trust auth, no password
    socket_dir: Path  # where its Unix socket lives
    stop: Callable[[], None]


def start_postgres(tmp_dir: Path, timeout: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Start a PostgreSQL server with a fresh cluster; returns its url and a function that stops it."""
    server = launch_postgres(tmp_dir, timeout)
    return server.url, server.stop


def launch_postgres(tmp_dir: Path, timeout: float = 30.0, tls: tuple[Path, Path] | None = None) -> PgServer:
    """Start a PostgreSQL server with a fresh cluster (under `tmp_dir`, or a /tmp dir of its own when we
    are root); with `tls` (certificate, key files) it also speaks TLS."""
    bin_dir = pg_bin_dir()
    if os.geteuid() == 0:
        # pytest keeps its temp dirs private to root (and resets that at each session start), so the
        # `postgres` user could not reach a cluster there: as root it goes into a /tmp dir of its own.
        root = Path(tempfile.mkdtemp(prefix="switchboard-pg-"))
        os.chmod(root, 0o755)
    else:
        root = Path(tmp_dir) / f"pg-{uuid.uuid4().hex[:8]}"
    data, sockets = root / "data", root / "sock"
    sockets.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    done = subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "-E", "UTF8"]),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
    tls_options: list[str] = []
    if tls:
        for source, name in zip(tls, ("server.crt", "server.key"), strict=True):
            shutil.copy(source, root / name)
            os.chmod(root / name, 0o600)  # PostgreSQL refuses a key others can read
            if os.geteuid() == 0:
                shutil.chown(root / name, "postgres")
        tls_options = ["-c", "ssl=on", "-c", f"ssl_cert_file={root / 'server.crt'}"]
        tls_options += ["-c", f"ssl_key_file={root / 'server.key'}"]
    port = _free_port()
    log = open(root / "postgres.log", "ab")
    proc = subprocess.Popen(
        _as_postgres(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-k",
                str(sockets),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                *tls_options,
            ]
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"postgresql://{USER}@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()  # passed on by runuser
                raise RuntimeError(f"PostgreSQL did not start; see {root / 'postgres.log'}") from None
            time.sleep(0.1)
    try:
        _wait_ready(url, deadline)
    except BaseException:
        proc.terminate()  # never leave a server behind; runuser passes SIGTERM on (SIGKILL it would not)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()  # "smart" shutdown would wait for clients; SIGTERM as postgres is "fast"
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)

    return PgServer(url, sockets, stop)


def _wait_ready(url: str, deadline: float) -> None:
    import pg8000.native

    while True:
        try:
            pg8000.native.Connection(USER, host="127.0.0.1", port=_port(url), database="postgres").close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def create_database(server_url: str, name: str | None = None) -> str:
    """A new empty database on the server; returns its url."""
    import pg8000.native

    name = name or f"t_{uuid.uuid4().hex[:12]}"
    con = pg8000.native.Connection(USER, host="127.0.0.1", port=_port(server_url), database="postgres")
    try:
        con.run(f'CREATE DATABASE "{name}"')
    finally:
        con.close()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL server for the whole session (its url, database `postgres`)."""
    try:
        url, stop = start_postgres(tmp_path_factory.mktemp("postgres"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield url
    stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database for this test: postgresql://switchboard@127.0.0.1:<port>/<name>."""
    return create_database(postgres_server)
