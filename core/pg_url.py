"""Read a `postgresql://` url the way libpq (psql, every PostgreSQL driver) reads it, so a url that
works with psql works here: a Unix socket directory as the host (`?host=/run/postgresql` or a
percent-encoded host), and `sslmode` with libpq's meaning. That meaning matters for hosted
databases: `require` encrypts without checking the certificate (their certificates are signed by
their own authority, not one this machine trusts), `verify-ca` checks it against `sslrootcert`
(or the system's authorities), `verify-full` checks the host name too.

Errors name the part of the url that is wrong, never its value: a url may carry a password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: Query parameters understood; libpq refuses unknown ones too, rather than ignore a typo.
PARAMETERS = ("host", "port", "user", "password", "dbname", "sslmode", "sslrootcert", "connect_timeout")
DEFAULT_TIMEOUT_S = 60.0


class BadDatabaseUrl(ValueError):
    """The url cannot be read; the message never contains any of its values."""


@dataclass
class PgTarget:
    user: str
    password: str | None
    host: str
    port: int
    database: str
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    #: A Unix socket directory (libpq's host starting with "/"); None for TCP.
    socket_dir: str | None = None
    connect_timeout: float = DEFAULT_TIMEOUT_S

    @classmethod
    def parse(cls, url: str) -> PgTarget:
        """postgresql://user:pass@host:port/db[?sslmode=require&sslrootcert=/path/ca.pem], or a
        socket: postgresql://user@/db?host=/run/postgresql (also postgresql://%2Frun%2Fpostgresql/db)."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise BadDatabaseUrl("use postgresql://user:pass@host:port/db")
        try:
            query = {name: values[-1] for name, values in parse_qs(parts.query, strict_parsing=False).items()}
            port = parts.port
        except ValueError:
            raise BadDatabaseUrl("its port is not a number (percent-encode '/', '@' or ':' in a password)") from None
        unknown = sorted(set(query) - set(PARAMETERS))
        if unknown:
            raise BadDatabaseUrl(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
        # The host as written (urlsplit's hostname lower-cases it, which would break a socket path).
        netloc_host = parts.netloc.rsplit("@", 1)[-1]
        netloc_host = netloc_host.rsplit(":", 1)[0] if not netloc_host.endswith("]") and port else netloc_host
        host = query.get("host") or unquote(netloc_host).strip("[]") or "127.0.0.1"
        sslmode = query.get("sslmode", "prefer")
        if sslmode not in SSL_MODES:
            raise BadDatabaseUrl(f"sslmode must be one of {', '.join(SSL_MODES)}")
        try:
            port = int(query.get("port") or port or 5432)
            timeout = float(query.get("connect_timeout") or DEFAULT_TIMEOUT_S)
        except ValueError:
            raise BadDatabaseUrl("port and connect_timeout must be numbers") from None
        if not 0 < port < 65536 or timeout <= 0:
            raise BadDatabaseUrl("port must be 1-65535 and connect_timeout positive")
        password = query.get("password")
        if password is None and parts.password is not None:
            password = unquote(parts.password)
        return cls(
            user=query.get("user") or unquote(parts.username or "") or "postgres",
            password=password,
            host=host,
            port=port,
            database=query.get("dbname") or unquote(parts.path.lstrip("/")) or "postgres",
            sslmode=sslmode,
            sslrootcert=query.get("sslrootcert"),
            socket_dir=host if host.startswith("/") else None,
            connect_timeout=timeout,
        )

    @property
    def unix_sock(self) -> str | None:
        """The socket file PostgreSQL creates in its socket directory for this port."""
        return f"{self.socket_dir.rstrip('/')}/.s.PGSQL.{self.port}" if self.socket_dir else None

    def ssl_argument(self) -> ssl.SSLContext | bool | None:
        """libpq's sslmode in pg8000's terms: False for no TLS, None to use TLS when the server offers
        it (unverified, as libpq's `prefer` does), True for TLS without checking the certificate,
        or a context that checks it."""
        if self.socket_dir or self.sslmode == "disable":
            return False
        if self.sslmode in ("allow", "prefer"):
            return None
        if self.sslmode == "require" and not self.sslrootcert:
            return True
        try:
            context = ssl.create_default_context(cafile=self.sslrootcert)
        except (OSError, ssl.SSLError) as exc:
            raise BadDatabaseUrl(f"sslrootcert {self.sslrootcert}: cannot be read ({type(exc).__name__})") from None
        context.check_hostname = self.sslmode == "verify-full"  # libpq: require with a root cert is verify-ca
        return context

    def public(self) -> str:
        """The url without its password (for logs and errors)."""
        if self.socket_dir:
            return f"postgresql://{self.user}@/{self.database}?host={self.socket_dir}&port={self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{self.user}@{host}:{self.port}/{self.database}"
