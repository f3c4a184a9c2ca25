"""`database_url` read as libpq reads it: Unix sockets, sslmode with libpq's meaning (checked against a
real PostgreSQL speaking TLS with a certificate made here), clear errors that never echo a password."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from core.config import load_settings
from core.db import PostgresDatabase
from core.errors import BadRequest, DatabaseUnavailable
from core.pg_url import BadDatabaseUrl, PgTarget
from tests.pg_server import USER, launch_postgres

SECRET = "s3cr@t:pw/x"
ENCODED = "s3cr%40t%3Apw%2Fx"


# -- reading the url --------------------------------------------------------------------------------
def test_a_tcp_url_with_an_encoded_password():
    target = PgTarget.parse(f"postgresql://sb:{ENCODED}@db.example:6543/chats")
    assert (target.user, target.password, target.host, target.port, target.database) == (
        "sb",
        SECRET,
        "db.example",
        6543,
        "chats",
    )
    assert target.unix_sock is None and "s3cr" not in target.public()
    assert target.public() == "postgresql://sb@db.example:6543/chats"
    assert PgTarget.parse("postgres://sb@[::1]/x").host == "::1"
    assert PgTarget.parse("postgres://sb@[::1]:7000/x").public() == "postgresql://sb@[::1]:7000/x"
    # libpq's readings: '+' stays a plus, query parameters win, the user names the default database.
    plus = PgTarget.parse("postgresql://sb@db/x?password=a+b%2Bc&user=name@server&application_name=wiki")
    assert (plus.password, plus.user, plus.application_name) == ("a+b+c", "name@server", "wiki")
    assert PgTarget.parse("postgresql://sb@db").database == "sb"
    assert PgTarget.parse("postgresql://sb@db/x").connect_timeout == 60.0
    assert PgTarget.parse("postgresql://sb@db/x?connect_timeout=0").connect_timeout is None, "0: no limit"
    assert PgTarget.parse("postgresql://sb@db/x?connect_timeout=1").connect_timeout == 2.0, "libpq: at least 2"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://sb@/chats?host=/run/PostgreSQL&port=5433",
        "postgresql://sb@%2Frun%2FPostgreSQL:5433/chats",
    ],
)
def test_a_unix_socket_directory_as_the_host(url):
    target = PgTarget.parse(url)
    assert target.unix_sock == "/run/PostgreSQL/.s.PGSQL.5433", "the path keeps its case"
    assert target.ssl_argument() is False, "no TLS over a local socket"
    assert target.public() == "postgresql://sb@/chats?host=/run/PostgreSQL&port=5433"


def test_sslmode_means_what_it_means_in_libpq(tmp_path):
    cert, _ = make_certificate(tmp_path)
    base = "postgresql://sb@db.example/chats"
    assert PgTarget.parse(base).ssl_argument() is None, "prefer (the default): TLS when offered"
    assert PgTarget.parse(base + "?sslmode=disable").ssl_argument() is False
    assert PgTarget.parse(base + "?sslmode=require").ssl_argument() is True, "encrypted, certificate unchecked"
    verify_ca = PgTarget.parse(f"{base}?sslmode=verify-ca&sslrootcert={cert}").ssl_argument()
    assert verify_ca.verify_mode == ssl.CERT_REQUIRED and not verify_ca.check_hostname
    require_with_root = PgTarget.parse(f"{base}?sslmode=require&sslrootcert={cert}").ssl_argument()
    assert require_with_root.verify_mode == ssl.CERT_REQUIRED, "libpq: require with a root certificate checks it"
    full = PgTarget.parse(f"{base}?sslmode=verify-full").ssl_argument()
    assert full.verify_mode == ssl.CERT_REQUIRED and full.check_hostname
    system = PgTarget.parse(f"{base}?sslmode=verify-full&sslrootcert=system").ssl_argument()
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    implied = PgTarget.parse(f"{base}?sslrootcert=system")
    assert implied.sslmode == "verify-full", "libpq: the system's authorities mean verify-full"
    with pytest.raises(BadDatabaseUrl, match="cannot be enforced"):
        PgTarget.parse(f"{base}?sslmode=require&channel_binding=require")  # the driver could be downgraded
    with pytest.raises(BadDatabaseUrl, match="sslrootcert=system needs"):
        PgTarget.parse(f"{base}?sslmode=require&sslrootcert=system")
    with pytest.raises(BadDatabaseUrl, match="sslcert needs"):
        PgTarget.parse(f"{base}?sslcert={cert}")


@pytest.mark.parametrize(
    "url, words",
    [
        (f"postgresql://sb:{ENCODED}@db:notaport/x", "port is not a number"),
        (f"postgresql://sb:{ENCODED}@db/x?sslmode=sometimes", "sslmode must be one of"),
        (f"postgresql://sb:{ENCODED}@db/x?sslmod=require", "1 unknown parameter(s) (did you mean sslmode?)"),
        (f"postgresql://sb:{ENCODED}@db/x?password=ab&cdsecret", "1 unknown parameter(s);"),
        (f"postgresql://sb:{ENCODED}@db/x?port=%C2%B2", "port must be a number"),
        (f"postgresql://sb:{ENCODED}@db/x?port=70000", "port must be a number from 1 to 65535"),
        (f"postgresql://sb:{ENCODED}@db/x?sslmode=verify-ca&sslrootcert=/nowhere/ca.pem", "cannot be read"),
        (f"mysql://sb:{ENCODED}@db/x", "use postgresql://"),
        (f"POSTGRESQL://sb:{ENCODED}@db/x", "use postgresql://"),
        ("postgresql://sb:s3cr?k9=x@db/x", "percent-encode"),
        ("postgresql://sb:s3cr#t@db/x", "percent-encode"),
        (f"postgresql://sb:{ENCODED}@db1,db2/x", "several hosts"),
        (f"postgresql://sb:{ENCODED}@db/x?connect_timeout=nan", "connect_timeout"),
        (f"postgresql://sb:{ENCODED}@db/x?channel_binding=require", "cannot be enforced"),
    ],
)
def test_a_bad_url_is_refused_at_start_naming_the_part_never_the_password(url, words, tmp_path):
    with pytest.raises(BadRequest) as info:
        load_settings(environ={"SWITCHBOARD_DATABASE_URL": url, "SWITCHBOARD_DATA_DIR": str(tmp_path)})
    message = str(info.value)
    assert words in message and "setting database_url" in message, message
    assert "s3cr" not in message and "%40" not in message and "k9" not in message and "cdsecret" not in message
    with pytest.raises((BadDatabaseUrl, BadRequest)):
        PgTarget.parse(url).ssl_argument()


# -- against a real PostgreSQL ----------------------------------------------------------------------
def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl, from Debian's base system)."""
    cert, key = folder / "server.crt", folder / "server.key"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
            + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
            + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(folder)
    server = launch_postgres(folder, tls=(cert, key))
    yield server, cert
    server.stop()


def encrypted(url: str) -> bool:
    database = PostgresDatabase(url, max_size=1)
    try:
        return database.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")[0]["ssl"]
    finally:
        database.close()


def test_each_sslmode_against_a_server_with_a_self_signed_certificate(tls_server):
    server, cert = tls_server
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    url = f"postgresql://{USER}@127.0.0.1:{port}/postgres"
    assert encrypted(url) is True, "prefer: the server offers TLS, so it is used"
    assert encrypted(url + "?sslmode=disable") is False
    assert encrypted(url + "?sslmode=require") is True, "a hosted database's own certificate is accepted"
    assert encrypted(f"{url}?sslmode=verify-full&sslrootcert={cert}") is True
    assert encrypted(f"postgresql://{USER}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={cert}")
    with pytest.raises(DatabaseUnavailable) as info:
        encrypted(url + "?sslmode=verify-full")  # the system's authorities do not know this certificate
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) and "127.0.0.1" in str(info.value)


def test_require_against_a_server_without_tls_is_refused_and_a_socket_connects(postgres_server, tmp_path):
    with pytest.raises(DatabaseUnavailable) as info:
        encrypted(postgres_server + "?sslmode=require")
    assert "refuses SSL" in str(info.value)
    server = launch_postgres(tmp_path)
    try:
        port = server.url.rsplit(":", 1)[1].split("/")[0]
        database = PostgresDatabase(f"postgresql://{USER}@/postgres?host={server.socket_dir}&port={port}")
        try:
            row = database.query("SELECT inet_server_addr() AS addr, 1 AS one")[0]
            assert row == {"addr": None, "one": 1}, "a Unix socket connection has no server address"
        finally:
            database.close()
    finally:
        server.stop()
