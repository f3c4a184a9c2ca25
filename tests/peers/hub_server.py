"""A loopback Hugging Face hub: the part of the HTTP API huggingface_hub 2.4 uses, plus fault injection.

Serves repos from ROOT/<org>/<name>/ (files in the top level). Endpoints, checked against
huggingface_hub's hf_api.py / file_download.py:
  GET  /api/models/{repo}[/revision/{rev}][?blobs=True]  -> {id, sha, siblings: [{rfilename, size?, blobId?, lfs?}]}
  GET  /api/models/{repo}/tree/{rev}?recursive=..         -> [{type, path, size, oid, lfs?: {oid, size, pointerSize}}]
  HEAD/GET /{repo}/resolve/{rev}/{file}                  -> X-Repo-Commit, ETag, Accept-Ranges and the body of a
                                                            small file; `Range: bytes=N-[M]` -> 206 + Content-Range
Like the real hub, weight (LFS) files are not served from the hub's host: /resolve/ answers them with a 302 to a
signed URL on another host (here a second server, "the CDN", on 127.0.0.2), carrying X-Linked-Size and
X-Linked-Etag (the sha256) for clients that stop at the redirect (huggingface_hub's HEAD does). The CDN refuses a
request that carries an `Authorization` header (400, as S3 does for a presigned URL: a client must drop the hub
token on the cross-host redirect) or a bad signature (403), and honours `Range` (206, or 416 past the end).
Unknown repos answer 401 + X-Error-Code: RepoNotFound (as the real hub does), unknown files 404 + EntryNotFound.
Gated repos (`gated` {repo: {tokens with access}}) list their files to anyone, but /resolve/ answers 401
(no token) or 403 (a token without access) with X-Error-Code: GatedRepo, as the real hub does.
Faults (HubServer attributes, or POST /_control as JSON from another process): `cut_after` {file: [n, ...]}
closes the connection after n body bytes of the next GETs of that file; `fail` {status, count, match, error_code}
answers `status` to requests whose path contains `match` (count None = forever); `throttle` bytes/s for file bodies;
`ignore_range` answers 200 with the whole file to a Range request (a server without range support); `truncate`
{file: n} makes the CDN's copy of a file only n bytes long (a broken mirror: it still advertises the full size).
GET /_log returns the request log (host "hub" or "cdn", method, path, range, status, bytes sent, auth).
Run as a process: python tests/peers/hub_server.py --port P --root DIR   (prints "READY <url>")
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
BODY_CHUNK = 16 * 1024


def _file_info(path: Path) -> dict:
    data = path.read_bytes()
    info = {"size": len(data), "git_oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if path.suffix in LFS_SUFFIXES:
        info["sha256"] = hashlib.sha256(data).hexdigest()
    return info


CDN_HOST = "127.0.0.2"  # another host on the loopback network: a redirect there leaves the hub's origin
URL_LIFETIME_S = 3600


class HubServer:
    """The hub's state: served repos, faults and the request log; start()/stop() run it (and its CDN) in threads."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root)
        self.cut_after: dict[str, list[int]] = {}
        self.fail: dict | None = None
        self.throttle: float | None = None
        self.ignore_range = False
        self.truncate: dict[str, int] = {}
        self.gated: dict[str, set[str]] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.secret = hashlib.sha256(str(time.time_ns()).encode()).digest()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.cdn = ThreadingHTTPServer((CDN_HOST, 0), _CdnHandler)
        for server in (self.httpd, self.cdn):
            server.daemon_threads = True
            server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.cdn_url = f"http://{CDN_HOST}:{self.cdn.server_address[1]}"
        self._threads: list[threading.Thread] = []

    def start(self) -> HubServer:
        for server, name in ((self.httpd, "test hub"), (self.cdn, "test hub cdn")):
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True, name=name)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self.httpd, self.cdn):
            server.shutdown()
            server.server_close()

    def reset(self) -> None:
        """Clear faults and the log."""
        with self.lock:
            self.cut_after, self.fail, self.throttle, self.log = {}, None, None, []
            self.ignore_range, self.truncate, self.gated = False, {}, {}

    def sign(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}:{expires}".encode(), "sha256").hexdigest()

    def transfers(self, name: str) -> list[dict]:
        """GETs that sent (some of) file `name`'s bytes: from the CDN for weights, the hub for small files."""
        with self.lock:
            return [e for e in self.log if e["method"] == "GET" and e["status"] != 302 and e["path"].endswith(name)]

    def repo(self, repo_id: str) -> Path | None:
        path = self.root / repo_id
        return path if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) and path.is_dir() else None

    def commit(self, repo: Path) -> str:
        """A commit sha that changes whenever a served file does."""
        digest = hashlib.sha1()
        for name, info in sorted(self.files(repo).items()):
            digest.update(f"{name}:{info['git_oid']}\n".encode())
        return digest.hexdigest()

    def files(self, repo: Path) -> dict[str, dict]:
        return {p.name: _file_info(p) for p in sorted(repo.iterdir()) if p.is_file()}

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        with self.lock:
            return [e for e in self.log if (method is None or e["method"] == method) and contains in e["path"]]

    def bytes_served(self, contains: str = "") -> int:
        """Body bytes written to sockets for GETs whose path contains `contains`."""
        return sum(e["bytes"] for e in self.requests("GET", contains))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a cut is a plain close
    host_name = "hub"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, fmt: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        entry = {
            "host": self.host_name,
            "method": method,
            "path": path,
            "range": self.headers.get("Range"),
            "status": 0,
            "bytes": 0,
            "auth": self.headers.get("Authorization"),
            "time": time.time(),
        }
        with self.hub.lock:
            self.hub.log.append(entry)
        try:
            self._route(method, path, query, entry)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, method: str, path: str, query: dict, entry: dict) -> None:
        if path == "/_log":
            return self._json(entry, 200, self.hub.requests())
        if path == "/_control" and method == "POST":
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            with self.hub.lock:
                for key in ("cut_after", "fail", "throttle", "ignore_range", "truncate"):
                    if key in body:
                        setattr(self.hub, key, body[key])
                if body.get("reset_log"):
                    self.hub.log = [entry]
            return self._json(entry, 200, {"ok": True})
        fail = self.hub.fail
        if fail and fail.get("match", "") in path and fail.get("count", None) != 0:
            with self.hub.lock:
                if fail.get("count") is not None:
                    fail["count"] -= 1
            code = {"X-Error-Code": fail["error_code"]} if fail.get("error_code") else None
            return self._json(entry, int(fail.get("status", 503)), {"error": "injected failure"}, code)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._model_info(entry, m.group(1), m.group(2) or "main", query)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path)
        if m:
            return self._tree(entry, m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(method, entry, m.group(1), m.group(2), m.group(3))
        return self._json(entry, 404, {"error": "no such route"})

    def _json(self, entry: dict, status: int, data: object, headers: dict | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        for key, value in {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **(headers or {}),
        }.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        entry["status"] = status

    def _repo_or_error(self, entry: dict, repo_id: str, rev: str) -> tuple[Path, str] | None:
        repo = self.hub.repo(repo_id)
        if repo is None:
            self._json(
                entry,
                401,
                {"error": "Repository not found"},
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            )
            return None
        sha = self.hub.commit(repo)
        if rev not in ("main", sha):
            self._json(entry, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo, sha

    def _model_info(self, entry: dict, repo_id: str, rev: str, query: dict) -> None:
        found = self._repo_or_error(entry, repo_id, rev)
        if not found:
            return
        repo, sha = found
        siblings = []
        for name, info in self.hub.files(repo).items():
            sib: dict = {"rfilename": name}
            if query.get("blobs", [""])[0].lower() == "true":
                sib.update(size=info["size"], blobId=info["git_oid"])
                if "sha256" in info:
                    sib["lfs"] = {"sha256": info["sha256"], "size": info["size"], "pointerSize": 134}
            siblings.append(sib)
        self._json(
            entry,
            200,
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "tags": [],
                "siblings": siblings,
            },
        )

    def _tree(self, entry: dict, repo_id: str, rev: str) -> None:
        found = self._repo_or_error(entry, repo_id, rev)
        if not found:
            return
        items = []
        for name, info in self.hub.files(found[0]).items():
            item: dict = {"type": "file", "path": name, "size": info["size"], "oid": info["git_oid"]}
            if "sha256" in info:
                item["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": 134}
            items.append(item)
        self._json(entry, 200, items)

    def _resolve(self, method: str, entry: dict, repo_id: str, rev: str, name: str) -> None:
        found = self._repo_or_error(entry, repo_id, rev)
        if not found:
            return
        repo, sha = found
        path = repo / name
        if "/" in name or not path.is_file():
            return self._json(
                entry, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
            )
        if (
            repo_id in self.hub.gated
            and name not in ("README.md", ".gitattributes")
            and self._refuse_gated(entry, repo_id)
        ):
            return
        info = _file_info(path)
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "ETag": f'"{info["git_oid"]}"'}
        if "sha256" in info:  # a weight file lives on the CDN: redirect there with a signed URL
            cdn_path = f"/lfs/{repo_id}/{info['sha256']}/{name}"
            expires = int(time.time()) + URL_LIFETIME_S
            location = f"{self.hub.cdn_url}{cdn_path}?Expires={expires}&Signature={self.hub.sign(cdn_path, expires)}"
            headers.update(
                {
                    "Location": location,
                    "X-Linked-Etag": f'"{info["sha256"]}"',
                    "X-Linked-Size": str(info["size"]),
                    "ETag": f'"{info["sha256"]}"',
                }
            )
            return self._json(entry, 302, {"message": f"Found. Redirecting to {location}"}, headers)
        self._send_file(method, entry, path.read_bytes(), name, headers)

    def _refuse_gated(self, entry: dict, repo_id: str) -> bool:
        """401/403 GatedRepo unless the request carries a token with access to `repo_id`."""
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if token and token in self.hub.gated[repo_id]:
            return False
        if token:
            status, message = (
                403,
                (
                    f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo_id} to ask for access."
                ),
            )
        else:
            status, message = (
                401,
                (
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to "
                    "access it. Please log in."
                ),
            )
        self._json(entry, status, {"error": message}, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
        return True

    def _send_file(self, method: str, entry: dict, data: bytes, name: str, headers: dict) -> None:
        """The file (or the requested range of it) with `headers`; 416 for a range past its end."""
        total, start, end = len(data), 0, len(data) - 1
        status = 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if rng and not self.hub.ignore_range:
            start = int(rng.group(1))
            end = min(int(rng.group(2)), total - 1) if rng.group(2) else total - 1
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                entry["status"] = 416
                return
            status = 206
        headers = {
            **headers,
            "Content-Length": str(end - start + 1),
            "Content-Type": "application/octet-stream",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        entry["status"] = status
        if method == "HEAD":
            return
        cut = None
        with self.hub.lock:
            plan = self.hub.cut_after.get(name)
            if plan:
                cut = plan.pop(0)
        self._send_body(entry, data[start : end + 1], cut)

    def _send_body(self, entry: dict, body: bytes, cut: int | None) -> None:
        limit = len(body) if cut is None else min(cut, len(body))
        sent = 0
        while sent < limit:
            chunk = body[sent : min(sent + BODY_CHUNK, limit)]
            self.wfile.write(chunk)
            self.wfile.flush()
            sent += len(chunk)
            entry["bytes"] = sent
            throttle = self.hub.throttle
            if throttle:
                time.sleep(len(chunk) / throttle)
        if cut is not None and cut < len(body):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _CdnHandler(_Handler):
    """The storage host that /resolve/ redirects weight files to: signed URLs, no hub token, Range."""

    host_name = "cdn"

    def _route(self, method: str, path: str, query: dict, entry: dict) -> None:
        fail = self.hub.fail
        if fail and fail.get("match", "") in path and fail.get("count", None) != 0:
            with self.hub.lock:
                if fail.get("count") is not None:
                    fail["count"] -= 1
            return self._xml(entry, int(fail.get("status", 503)), "ServiceUnavailable", "injected failure")
        if self.headers.get("Authorization"):
            return self._xml(
                entry,
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string "
                "parameter or the Authorization header should be specified",
            )
        m = re.fullmatch(r"/lfs/([^/]+/[^/]+)/([0-9a-f]{64})/([^/]+)", path)
        expires = (query.get("Expires") or ["0"])[0]
        signature = (query.get("Signature") or [""])[0]
        valid = m and expires.isdigit() and hmac.compare_digest(signature, self.hub.sign(path, int(expires)))
        if not valid or int(expires) < time.time():
            return self._xml(entry, 403, "AccessDenied", "Access denied: the URL is not signed or has expired")
        repo = self.hub.repo(m.group(1))
        file = repo / m.group(3) if repo else None
        if file is None or not file.is_file() or _file_info(file).get("sha256") != m.group(2):
            return self._xml(entry, 404, "NoSuchKey", "The specified key does not exist.")
        data = file.read_bytes()
        keep = self.hub.truncate.get(m.group(3))
        self._send_file(
            method, entry, data[:keep] if keep is not None else data, m.group(3), {"ETag": f'"{m.group(2)}"'}
        )

    def _xml(self, entry: dict, status: int, code: str, message: str) -> None:
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        entry["status"] = status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", required=True, type=Path)
    args = parser.parse_args(argv)
    hub = HubServer(args.root, port=args.port).start()
    print(f"READY {hub.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
