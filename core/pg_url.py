"""Read a `postgresql://` url the way libpq (psql, most PostgreSQL drivers) reads it, so the urls that
hosted databases and `psql` use work here: a Unix socket directory as the host (`?host=/run/postgresql`
or a percent-encoded host), `sslmode` with libpq's meaning, `sslrootcert`, client certificates,
`channel_binding`, `application_name`, `connect_timeout`. `sslmode` matters for hosted databases:
`require` encrypts without checking the certificate (they sign theirs with their own authority),
`verify-ca` checks it against `sslrootcert`, `verify-full` checks the host name too.

Errors say which part of the url is wrong and never repeat a value from it: a url may carry a password.
"""

from __future__ import annotations

import difflib
import getpass
import math
import os
import re
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
CHANNEL_BINDING = ("disable", "prefer", "require")
#: Query parameters understood; libpq refuses unknown ones too, rather than ignore a typo.
PARAMETERS = (
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "channel_binding",
    "connect_timeout",
    "application_name",
)
#: Where Debian's PostgreSQL (and libpq's default) puts its socket: a url without a host uses it.
DEFAULT_SOCKET_DIR = "/var/run/postgresql"
#: pg8000 has one timeout for a connect and for every read; reads get this one once connected.
READ_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 60.0


class BadDatabaseUrl(ValueError):
    """The url cannot be read; the message never contains a value from it."""


def _query(text: str) -> dict[str, str]:
    """`a=1&b=2` as libpq reads it: percent-decoding only (`+` stays a plus, as in a password)."""
    out: dict[str, str] = {}
    for item in filter(None, text.split("&")):
        name, _, value = item.partition("=")
        out[unquote(name)] = unquote(value)
    return out


def _host_and_port(netloc: str) -> tuple[str, str]:
    """The host and port as written after any user:password@ ([v6] kept apart from its port)."""
    where = netloc.rpartition("@")[2]
    if where.startswith("["):
        host, _, rest = where[1:].partition("]")
        return host, rest.removeprefix(":")
    host, colon, port = where.rpartition(":")
    return (host, port) if colon else (where, "")


@dataclass
class PgTarget:
    user: str
    password: str | None
    host: str
    port: int
    database: str
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    #: Seconds a connect may take (None: no limit, libpq's 0).
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S
    application_name: str = "switchboard"

    @classmethod
    def parse(cls, url: str) -> PgTarget:
        """postgresql://user:pass@host:port/db[?sslmode=require&sslrootcert=/path/ca.pem], or a
        socket: postgresql://user@/db?host=/run/postgresql (also postgresql://%2Frun%2Fpostgresql/db)."""
        if not url.startswith(("postgresql://", "postgres://")):  # libpq's check is case-sensitive too
            raise BadDatabaseUrl("use postgresql://user:pass@host:port/db")
        parts = urlsplit(url)
        if "@" not in parts.netloc and "@" in parts.path or parts.fragment:
            # An unencoded '/' or '#' in the password ended the user part early (a '?' shows as
            # unknown parameters below).
            raise BadDatabaseUrl("percent-encode '/', '?', '#', '@' and ':' in the user name and password")
        query = _query(parts.query)
        unknown = sorted(set(query) - set(PARAMETERS))
        if unknown:
            # Their names are not repeated (a misplaced password may be one); a likely misspelling is.
            hints = sorted({m for name in unknown for m in difflib.get_close_matches(name, PARAMETERS, 1, 0.75)})
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            raise BadDatabaseUrl(f"{len(unknown)} unknown parameter(s){hint}; known: {', '.join(PARAMETERS)}")
        written_host, written_port = _host_and_port(parts.netloc)
        host = query.get("host") or unquote(written_host)
        if "," in host or "," in written_port:
            raise BadDatabaseUrl("several hosts in one url are not supported: name one")
        if not host:
            host = DEFAULT_SOCKET_DIR if os.path.isdir(DEFAULT_SOCKET_DIR) else "localhost"
        sslmode = query.get("sslmode") or "prefer"
        if sslmode not in SSL_MODES:
            raise BadDatabaseUrl(f"sslmode must be one of {', '.join(SSL_MODES)}")
        binding = query.get("channel_binding") or "prefer"
        if binding not in CHANNEL_BINDING:
            raise BadDatabaseUrl(f"channel_binding must be one of {', '.join(CHANNEL_BINDING)}")
        if binding == "require":
            # pg8000 binds when the server offers it but would also answer a cleartext password
            # request, so "require" cannot be kept; checking the certificate protects the same way.
            raise BadDatabaseUrl(
                "channel_binding=require cannot be enforced by this driver: check the server's certificate "
                "instead (sslmode=verify-full with sslrootcert=system or your provider's CA file)"
            )
        if query.get("sslrootcert") == "system":  # libpq: the system's authorities mean verify-full
            sslmode = query.get("sslmode") or "verify-full"
            if sslmode not in ("verify-ca", "verify-full"):
                raise BadDatabaseUrl("sslrootcert=system needs sslmode=verify-full (or verify-ca)")
        if query.get("sslcert") and sslmode not in ("require", "verify-ca", "verify-full"):
            raise BadDatabaseUrl("sslcert needs sslmode=require, verify-ca or verify-full")
        port_text = query.get("port") or written_port or "5432"
        timeout_text = query.get("connect_timeout") or str(DEFAULT_CONNECT_TIMEOUT_S)
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise BadDatabaseUrl("the port must be a number from 1 to 65535")
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise BadDatabaseUrl("connect_timeout must be a number of seconds") from None
        if not math.isfinite(timeout) or timeout < 0:
            raise BadDatabaseUrl("connect_timeout must be a number of seconds (0: no limit)")
        user = query.get("user") or unquote(parts.username or "")
        if not user:
            try:
                user = getpass.getuser()  # libpq's default: the process's own user
            except (KeyError, OSError):
                raise BadDatabaseUrl("name a user (this process's user has no name)") from None
        password = query.get("password")
        if password is None and parts.password is not None:
            password = unquote(parts.password)
        name = query.get("application_name") or "switchboard"
        return cls(
            user=user,
            password=password,
            host=host,
            port=int(port_text),
            database=query.get("dbname") or unquote(parts.path.lstrip("/")) or user,
            sslmode=sslmode,
            sslrootcert=query.get("sslrootcert"),
            sslcert=query.get("sslcert"),
            sslkey=query.get("sslkey"),
            connect_timeout=max(timeout, 2.0) if timeout else None,  # libpq: 0 is no limit, under 2 is 2
            application_name=re.sub(r"[^\x20-\x7e]", "?", name)[:63],
        )

    @property
    def socket_dir(self) -> str | None:
        """A Unix socket directory (libpq's host starting with "/"); None for TCP."""
        return self.host if self.host.startswith("/") else None

    @property
    def unix_sock(self) -> str | None:
        """The socket file PostgreSQL creates in its socket directory for this port."""
        return f"{self.socket_dir.rstrip('/')}/.s.PGSQL.{self.port}" if self.socket_dir else None

    def ssl_argument(self) -> ssl.SSLContext | bool | None:
        """libpq's sslmode in pg8000's terms: False for no TLS, None to use TLS when the server offers
        it (unverified, as libpq's `prefer`; `allow` does the same), True for TLS without checking the
        certificate, or a context (one that checks it, or that carries a client certificate)."""
        if self.socket_dir or self.sslmode == "disable":
            return False
        verify = self.sslmode in ("verify-ca", "verify-full") or (
            self.sslmode == "require" and self.sslrootcert not in (None, "system")
        )
        if self.sslmode in ("allow", "prefer") or not (verify or self.sslcert):
            return None if self.sslmode in ("allow", "prefer") else True
        try:
            context = ssl.create_default_context(cafile=None if self.sslrootcert == "system" else self.sslrootcert)
            if self.sslcert:
                context.load_cert_chain(self.sslcert, self.sslkey, password=lambda: "")  # never a prompt
        except (OSError, ssl.SSLError) as exc:
            raise BadDatabaseUrl(
                f"sslrootcert/sslcert/sslkey: a file cannot be read or used ({type(exc).__name__})"
            ) from None
        context.check_hostname = self.sslmode == "verify-full"  # libpq: require with a root cert is verify-ca
        if not verify:
            context.verify_mode = ssl.CERT_NONE
        return context

    def public(self) -> str:
        """The url without its password (for logs and errors)."""
        if self.socket_dir:
            return f"postgresql://{self.user}@/{self.database}?host={self.socket_dir}&port={self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{self.user}@{host}:{self.port}/{self.database}"
