"""The deployment files in deploy/ (docs/deployment.md): each is checked by the tool that will read it.

- compose.yaml: `docker-compose config` (Debian's docker-compose 1.29, `make services`; no Docker daemon
  needed) and, always, what the services need of each other and of Settings.
- nginx.conf: `nginx -t` on the file rendered as the multi-process tests render it, then a real nginx in
  front of a tiny backend: a WebSocket upgrade and an SSE stream pass through, unbuffered.
- switchboard.service: parsed, then `systemd-analyze verify`.
- Dockerfile(s): the torch pin and the paths they name.
"""

from __future__ import annotations

import base64
import configparser
import dataclasses
import hashlib
import http.client
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from core.config import Settings, load_settings
from tests.helpers import ROOT, free_port

DEPLOY = ROOT / "deploy"
SWITCHBOARDS = ("switchboard-1", "switchboard-2")
UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+\S+:\d+", re.MULTILINE)


def settings_env_names() -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(Settings) if f.metadata.get("env")}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def write_env(directory: Path, **values: str) -> Path:
    env = directory / ".env"
    env.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return env


SECRETS = {"SWITCHBOARD_API_TOKEN": "t0ken", "POSTGRES_PASSWORD": "pw", "LLAMA_API_KEY": "k3y"}


# ---- compose.yaml ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose missing: make services")
def test_docker_compose_config_validates(tmp_path: Path):
    run = ["docker-compose", "-f", str(DEPLOY / "compose.yaml")]
    done = subprocess.run(
        [*run, "--env-file", str(write_env(tmp_path, **SECRETS)), "config"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) >= {*SWITCHBOARDS, "nginx", "redis", "postgres", "ollama", "llama-server"}
    env = resolved["services"]["switchboard-1"]["environment"]
    assert env["SWITCHBOARD_DATABASE_URL"] == "postgresql://switchboard:pw@postgres:5432/switchboard"
    assert env["SWITCHBOARD_API_TOKEN"] == "t0ken"
    # A secret left out of .env stops the start instead of running without it.
    partial = write_env(tmp_path, POSTGRES_PASSWORD="pw", LLAMA_API_KEY="k")
    done = subprocess.run([*run, "--env-file", str(partial), "config"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "SWITCHBOARD_API_TOKEN" in done.stderr


def test_compose_services_fit_together():
    spec = compose()
    services, volumes = spec["services"], set(spec.get("volumes") or {})
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name} has no image"
        for target in svc.get("depends_on") or {}:
            assert target in services, f"{name} depends on unknown {target}"
        for mount in svc.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
    # The one-shot download fills the volume llama-server reads, and llama-server waits for it to succeed.
    download, llama = services["model-download"], services["llama-server"]
    assert download["restart"] == "no"
    assert llama["depends_on"]["model-download"]["condition"] == "service_completed_successfully"
    download_volume = {m.split(":")[0] for m in download["volumes"]}
    assert any(m.split(":")[0] in download_volume and m.endswith(":ro") for m in llama["volumes"])
    # nginx waits for both processes, publishes 8080 and mounts deploy/nginx.conf.
    nginx = services["nginx"]
    assert set(nginx["depends_on"]) == set(SWITCHBOARDS)
    assert any(p.endswith(":80") and "8080" in p for p in nginx["ports"])
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "ping" in services["redis"]["healthcheck"]["test"]
    # Only nginx is reachable from outside.
    assert [n for n, s in services.items() if s.get("ports")] == ["nginx"]


def test_compose_environment_names_are_settings():
    services = compose()["services"]
    known = settings_env_names()
    for name in SWITCHBOARDS:
        env = services[name]["environment"]
        ours = {k for k in env if k.startswith("SWITCHBOARD_") or k in ("MODEL_DIR", "OLLAMA_HOST")}
        assert ours <= known, f"{name}: not settings: {sorted(ours - known)}"
        assert env["SWITCHBOARD_REDIS_URL"] == "redis://redis:6379/0"
        assert env["SWITCHBOARD_DATABASE_URL"].startswith("postgresql://switchboard:${POSTGRES_PASSWORD")
        assert env["SWITCHBOARD_DATABASE_URL"].endswith("@postgres:5432/switchboard")
        assert env["OLLAMA_HOST"] == "http://ollama:11434"
        # Secrets come from .env: every key, token and password is a ${...} reference, never a literal.
        for key, value in env.items():
            if re.search(r"TOKEN|KEY|PASSWORD", key):
                assert str(value).startswith("${"), f"{name}: {key} is hard-coded"
    example = (DEPLOY / ".env.example").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", (DEPLOY / "compose.yaml").read_text()))
    assert required and all(re.search(rf"^{v}=", example, re.MULTILINE) for v in required)


def test_compose_config_toml_connects_to_llama_server(tmp_path: Path):
    services = compose()["services"]
    mount = next(m for m in services["switchboard-1"]["volumes"] if m.startswith("./config.toml:"))
    in_container = mount.split(":")[1]
    assert services["switchboard-1"]["environment"]["SWITCHBOARD_CONFIG"] == in_container
    settings = load_settings(
        {}, {"SWITCHBOARD_CONFIG": str(DEPLOY / "config.toml"), "SWITCHBOARD_DATA_DIR": str(tmp_path)}
    )
    (conn,) = settings.connections
    command = services["llama-server"]["command"]
    port, alias = command[command.index("--port") + 1], command[command.index("--alias") + 1]
    assert conn.base_url == f"http://llama-server:{port}/v1"
    assert conn.default == alias
    # The connection's key variable is what llama-server reads as its --api-key.
    assert conn.env in services["switchboard-1"]["environment"]
    assert conn.env == "LLAMA_API_KEY" and "LLAMA_API_KEY" in services["llama-server"]["environment"]


# ---- nginx.conf ----------------------------------------------------------------------------------------


def render_nginx(tmp_path: Path, upstream_ports: list[int], listen: int) -> Path:
    """deploy/nginx.conf as the multi-process tests render it: upstream servers and the listen port replaced."""
    text = (DEPLOY / "nginx.conf").read_text()
    lines = UPSTREAM_SERVER.findall(text)
    assert len(lines) == 2 and text.count("listen 80;") == 1 and text.count("upstream switchboard {") == 1
    servers = iter(upstream_ports)
    text = UPSTREAM_SERVER.sub(lambda m: f"{m.group(1)}server 127.0.0.1:{next(servers)}", text)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text.replace("listen 80;", f"listen 127.0.0.1:{listen};"))
    return conf


def nginx_args(tmp_path: Path, conf: Path, *extra: str) -> list[str]:
    return [
        "nginx",
        "-p",
        str(tmp_path),
        "-e",
        "stderr",
        "-c",
        str(conf),
        "-g",
        f"pid {tmp_path}/nginx.pid;{''.join(extra)}",
    ]


needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx missing: make services")


@needs_nginx
def test_nginx_config_is_valid_standalone(tmp_path: Path):
    conf = render_nginx(tmp_path, [free_port(), free_port()], free_port())
    done = subprocess.run(
        nginx_args(tmp_path, conf)[:1] + ["-t"] + nginx_args(tmp_path, conf)[1:],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    text = (DEPLOY / "nginx.conf").read_text()
    for needed in (
        "ip_hash;",
        "proxy_http_version 1.1;",
        "proxy_buffering off;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Host $http_host;",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
    ):
        assert needed in text
    # The body limit is the server's: knowledge.max_document_mb + 1 MiB, at least 25 MiB.
    limit_mb = max(25, Settings().knowledge_max_document_mb + 1)
    assert f"client_max_body_size {int(limit_mb)}m;" in text


class Backend(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 backend: /sse streams two events (the second only once the client saw the first, or
    after 5 s); anything with `Upgrade: websocket` gets 101 and then an echo of raw bytes."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, port: int):
        self.seen_first, self.sent_second = threading.Event(), threading.Event()
        self.requests: list[dict] = []
        super().__init__(("127.0.0.1", port), BackendHandler)


class BackendHandler(socketserver.StreamRequestHandler):
    def handle(self):
        head = []
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            head.append(line.decode("latin-1").rstrip("\r\n"))
        if not head:
            return
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        self.server.requests.append({"line": head[0], **headers})
        if headers.get("upgrade", "").lower() == "websocket" and "upgrade" in headers.get("connection", "").lower():
            accept = hashlib.sha1((headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
            self.wfile.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + base64.b64encode(accept.digest()) + b"\r\n\r\n"
            )
            self.wfile.write(b"pong:" + self.request.recv(64))
            return
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        self.wfile.write(b"data: first\n\n")
        self.wfile.flush()
        self.server.seen_first.wait(5)
        self.server.sent_second.set()
        self.wfile.write(b"data: second\n\n")


@needs_nginx
def test_nginx_passes_websocket_upgrade_and_unbuffered_sse(tmp_path: Path):
    backend = Backend(free_port())
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    listen = free_port()
    conf = render_nginx(tmp_path, [backend.server_address[1], backend.server_address[1]], listen)
    proc = subprocess.Popen(nginx_args(tmp_path, conf, "daemon off;"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", listen)) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.poll() else "no nginx"
            )
            time.sleep(0.05)
        # SSE: the first event reaches the client while the backend still holds the second.
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
        conn.request("POST", "/api/chat", body=b"{}", headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert b"data: first" in response.read1(1024)
        assert not backend.sent_second.is_set(), "nginx held the first event until the stream ended"
        backend.seen_first.set()
        assert b"data: second" in response.read()
        sent = backend.requests[-1]
        assert sent["host"] == f"127.0.0.1:{listen}"  # the port kept: Origin checks compare it
        assert sent["x-forwarded-for"] == "127.0.0.1" and sent["x-forwarded-proto"] == "http"
        # WebSocket: the upgrade reaches the backend and the connection then carries raw bytes both ways.
        with socket.create_connection(("127.0.0.1", listen), timeout=10) as ws:
            key = base64.b64encode(b"0123456789abcdef").decode()
            ws.sendall(
                f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: localhost:{listen}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += ws.recv(4096)
            assert reply.startswith(b"HTTP/1.1 101"), reply
            ws.sendall(b"ping")
            echoed = reply.split(b"\r\n\r\n", 1)[1]
            while len(echoed) < len(b"pong:ping"):
                echoed += ws.recv(64)
            assert echoed == b"pong:ping"
    finally:
        proc.terminate()
        proc.wait(10)
        backend.shutdown()
        backend.server_close()


# ---- switchboard.service -----------------------------------------------------------------------------


def test_systemd_unit_runs_run_py_hardened():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "switchboard.service")
    service = unit["Service"]
    workdir = Path(service["WorkingDirectory"])
    python, script, *args = service["ExecStart"].split()
    assert python == str(workdir / ".venv/bin/python") and script == "run.py" and (ROOT / script).is_file()
    assert args[args.index("--port") + 1] == "5000"
    assert service["Restart"] == "on-failure" and service["User"] == "switchboard"
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/")
    assert service["ProtectSystem"] == "strict" and service["ReadWritePaths"] == "/var/lib/switchboard"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectKernelTunables", "RestrictSUIDSGID"):
        assert service[key] == "yes", key
    # The data dir it may write is the one Switchboard writes (configparser keeps the last Environment=).
    text = (DEPLOY / "switchboard.service").read_text()
    assert "Environment=SWITCHBOARD_DATA_DIR=/var/lib/switchboard" in text
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path: Path):
    # The checkout moved to this repository, so ExecStart's interpreter exists (verify checks it).
    unit = tmp_path / "switchboard.service"
    unit.write_text((DEPLOY / "switchboard.service").read_text().replace("/opt/switchboard", str(ROOT)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(unit) not in done.stderr and "switchboard.service" not in done.stderr, done.stderr  # unknown keys warn


# ---- Dockerfiles ---------------------------------------------------------------------------------------


def requirement_pin(name: str) -> str:
    return re.search(rf"^{name}==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_pins_and_paths(dockerfile: str):
    text = (DEPLOY / dockerfile).read_text()
    assert re.findall(r"torch==(\S+)", text) == [requirement_pin("torch")]
    assert "--index-url ${TORCH_INDEX} torch==" in text
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/\w+$", text, re.MULTILINE)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"{dockerfile} copies missing {path}"
    cmd = re.search(r'^CMD \["python", "run\.py", "--host", "0\.0\.0\.0", "--port", "(\d+)"\]$', text, re.MULTILINE)
    assert cmd and re.search(rf"^EXPOSE {cmd.group(1)}$", text, re.MULTILINE)
    run_py = (ROOT / "run.py").read_text()
    assert 'add_argument("--host"' in run_py and 'add_argument("--port"' in run_py
    health = re.search(r"HEALTHCHECK .*\n.*http://127\.0\.0\.1:(\d+)(/\w+)", text)
    assert health and health.group(1) == cmd.group(1)
    assert f'@bp.get("{health.group(2)}")' in (ROOT / "web_ui/api.py").read_text()
    assert f'"{health.group(2)}"' in (ROOT / "web_ui/auth.py").read_text()  # public: no token needed
    # Data and model cache are volumes the non-root user owns, and the settings point at them.
    uid = re.search(r"useradd .*--uid (\d+) .* switchboard", text).group(1)
    assert re.search(rf"^USER {uid}:{uid}$", text, re.MULTILINE) and uid != "0"
    assert 'VOLUME ["/data", "/models"]' in text
    assert "SWITCHBOARD_DATA_DIR=/data" in text and "MODEL_DIR=/models" in text


def test_cuda_dockerfile_builds_the_pinned_llama_cpp():
    pinned = re.search(r'^LLAMA_CPP_VERSION = "(.+)"', (DEPLOY / "install_llama_cpp.py").read_text(), re.MULTILINE)
    text = (DEPLOY / "Dockerfile.cuda").read_text()
    assert re.findall(r"llama-cpp-python==(\S+)", text) == [pinned.group(1)]
    assert "-DGGML_CUDA=on" in text
