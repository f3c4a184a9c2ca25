"""Which Host headers and which web origins may use the server (docs/security.md says why).

- **Host** (every request, Socket.IO and static files included): a page on another site that makes
  its own name resolve to this machine (DNS rebinding) reaches the server with *its* name in the
  Host header. So a Host must be an IP address (a rebinding page never has one: it needs a name it
  controls), `localhost` or a `*.localhost` name (browsers resolve those to loopback themselves),
  this machine's own name, the bound address, or a name in `server.allowed_hosts` ("*": any).
  With an access token set, any Host is accepted: a rebinding page cannot present the token.
- **Origin** (requests that change something, and Socket.IO): the page's own origin (the Origin's
  host:port equals the validated Host) or one in `server.allowed_origins` ("*": any). `null` (a
  sandboxed frame, a file) never is. Without an Origin the Referer's origin counts; without either,
  a browser's `Sec-Fetch-Site: cross-site|same-site` still marks the request as foreign, while a
  client that sends none of these (curl, SDKs) is not a browser and is let through.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Protocol
from urllib.parse import urlsplit

from core.config import Settings
from web_ui.errors import printable

ANY = "*"
LOOPBACK_NAMES = ("localhost",)
DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
FOREIGN_FETCH_SITES = ("cross-site", "same-site")


def split_host(value: str) -> tuple[str, str]:
    """`host[:port]` (IPv6 in brackets) → (lower-case host without brackets, port or '')."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port
    return value, ""


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _machine_names() -> set[str]:
    """This machine's own names (a LAN client may use them); empty when the system cannot say."""
    try:
        name = socket.gethostname().lower()
    except OSError:
        return set()
    return {name, f"{name}.local"} if name else set()


def _normalized_origin(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case with a default port dropped, or None when `origin` is not one."""
    try:
        parts = urlsplit(origin.strip().lower())
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc or "@" in parts.netloc or parts.path not in ("", "/"):
        return None
    host, port = split_host(parts.netloc)
    if not host or (port and not port.isdigit()):
        return None
    port = "" if port == DEFAULT_PORTS[parts.scheme] else port
    return f"{parts.scheme}://{_joined(host, port)}"


def _joined(host: str, port: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port else shown


class Headers(Protocol):
    """Request headers by name (werkzeug's Headers, or a dict in tests)."""

    def get(self, key: str, default: None = None) -> str | None: ...


class OriginPolicy:
    """The allowed hosts and origins of one server, from its settings."""

    def __init__(self, settings: Settings) -> None:
        self.token_set = bool(settings.api_token)
        hosts = {h.strip().lower().strip("[]") for h in settings.allowed_hosts if h.strip()}
        self.any_host = ANY in hosts or self.token_set
        bound = split_host(settings.host)[0] if settings.host else ""
        self.hosts = hosts | set(LOOPBACK_NAMES) | _machine_names() | ({bound} if bound else set())
        origins = [o for o in settings.allowed_origins if o.strip()]
        self.any_origin = ANY in origins
        self.origins = {n for n in (_normalized_origin(o) for o in origins if o != ANY) if n}

    # -- Host ------------------------------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request with this Host header may be served at all."""
        if not host_header or self.any_host:
            return True  # no Host: HTTP/1.0 clients, never a browser
        host, _ = split_host(host_header)
        return is_ip(host) or host in self.hosts or host.endswith(".localhost")

    # -- Origin ----------------------------------------------------------------------------------
    def configured_origin(self, origin: str) -> bool:
        """Whether `origin` is one of `server.allowed_origins` (they also get CORS headers)."""
        normalized = _normalized_origin(origin)
        return normalized is not None and (self.any_origin or normalized in self.origins)

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """Whether a page at `origin` may use the server reached with `host_header` (None: no page, no CORS)."""
        normalized = _normalized_origin(origin) if origin else None
        if normalized is None:
            return False  # "null", garbage, credentials in it
        if self.any_origin or normalized in self.origins:
            return True
        if not host_header or not self.host_allowed(host_header):
            return False
        origin_netloc = normalized.split("://", 1)[1]
        return _strip_default_port(origin_netloc) == _strip_default_port(host_header.strip().lower())

    def foreign_browser_request(self, headers: Headers) -> str | None:
        """Why a request is from a page this server does not trust (None when it is not)."""
        host = headers.get("Host")
        origin = headers.get("Origin")
        if origin is not None:
            return None if self.origin_allowed(origin, host) else f"origin {printable(origin)} is not allowed"
        referer = headers.get("Referer")
        if referer:
            source = _origin_of(referer)
            return None if self.origin_allowed(source, host) else f"referer origin {printable(source)} is not allowed"
        if (headers.get("Sec-Fetch-Site") or "").lower() in FOREIGN_FETCH_SITES:
            return "a cross-site browser request without an Origin"
        return None


def _origin_of(url: str) -> str:
    """`scheme://netloc` of a URL such as a Referer ("null" when it has none or cannot be read)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "null"
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"


def _strip_default_port(netloc: str) -> str:
    host, port = split_host(netloc)
    return _joined(host, "" if port in ("80", "443") else port)
