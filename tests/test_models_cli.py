"""Every `models` / `cache` command and its exit code (docs/models.md), data on stdout, messages on stderr."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.models import cli
from core.models.cache import INCOMPLETE, PARTIAL_DIR, READY, ModelCache
from core.models.catalog import BUNDLED_REPO

pytest.register_assert_rewrite("tests.peers.hub_fixtures")  # shared fixtures, see pytest_plugins
from tests.peers.hub_fixtures import REPO, WEIGHTS, dead_endpoint  # noqa: E402

pytest_plugins = ["tests.peers.hub_fixtures"]  # tiny_model, hub_root, hub, cache_root

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHBOARD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SWITCHBOARD_DOWNLOAD_RETRY_DELAY", "0.02")
    monkeypatch.delenv("MODEL_DIR", raising=False)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def sb(cache_root: Path, *argv: str) -> int:
    return cli.main(["--model-dir", str(cache_root), *argv])


def pulled(cache_root: Path, hub) -> ModelCache:
    assert sb(cache_root, "models", "pull", REPO, "--endpoint", hub.url) == 0
    return ModelCache(cache_root)


def test_pull_prints_the_path_and_a_second_pull_is_a_no_op(hub, cache_root, capsys):
    cache = pulled(cache_root, hub)
    out, err = capsys.readouterr()
    assert out.strip() == str(cache_root / REPO) and f"downloaded {REPO}" in err
    assert cache.status(REPO).status == READY
    assert sb(cache_root, "models", "pull", f"local:{REPO}", "--endpoint", hub.url) == 0
    assert "already complete" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["models", "pull", "../../etc/passwd"], 2, "must look like"),
        (["models", "pull", "org/../x"], 2, "must look like"),
        (["models", "pull", "../x"], 2, "invalid"),
        (["models", "pull", "/abs/path"], 2, "must look like"),
        (["models", "pull", "test-org/missing"], 3, "not found"),
        (["models", "pull", REPO, "--endpoint", "ftp://nowhere"], 2, "not an http(s) URL"),
        (["models", "verify", "test-org/missing"], 3, "not in the cache"),
        (["models", "verify", "org/.."], 2, "invalid"),
        (["models", "rm", "test-org/missing", "--force"], 3, "not in the cache"),
        (["models", "rm", "a/b/c", "--force"], 2, "must look like"),
        (["cache", "clean", "test-org/missing", "--force"], 3, "not in the cache"),
    ],
)
def test_bad_input_and_unknown_models(hub, cache_root, capsys, argv, code, message):
    if argv[1] == "pull" and "--endpoint" not in argv:
        argv = [*argv, "--endpoint", hub.url]
    assert sb(cache_root, *argv) == code
    out, err = capsys.readouterr()
    assert out == "" and message in err
    assert not any(p.name != ".locks" for p in cache_root.iterdir())


def test_pull_with_every_endpoint_failing_exits_1_and_lists_them(hub, cache_root, capsys):
    hub.fail = {"status": 503}
    dead = dead_endpoint()
    assert sb(cache_root, "models", "pull", REPO, "--endpoint", hub.url, "--endpoint", dead) == 1
    err = capsys.readouterr().err
    assert hub.url in err and dead in err and "HTTP 503" in err


def test_pull_no_wait_while_another_process_downloads_exits_4(hub, cache_root, tmp_path):
    holder = ModelCache(cache_root).lock(REPO)
    assert holder.try_acquire()
    try:
        env = dict(os.environ, SWITCHBOARD_DATA_DIR=str(tmp_path / "data"), HF_HUB_DISABLE_TELEMETRY="1")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "core.models.cli",
                "--model-dir",
                str(cache_root),
                "models",
                "pull",
                REPO,
                "--endpoint",
                hub.url,
                "--no-wait",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.release()
    assert proc.returncode == 4 and "already downloading" in proc.stderr and proc.stdout == ""


def test_models_list_shows_catalog_and_cache(hub, cache_root, capsys):
    cache = pulled(cache_root, hub)
    cache.touch_last_used(REPO)
    (cache_root / "other-org" / "half-model").mkdir(parents=True)
    (cache_root / "other-org" / "half-model" / "config.json").write_text("{}")
    capsys.readouterr()
    assert sb(cache_root, "models", "list", "--json") == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[BUNDLED_REPO]["status"] == "not downloaded" and rows[BUNDLED_REPO]["in_catalog"]
    assert rows[REPO]["status"] == READY and rows[REPO]["size_bytes"] > 1_000_000
    assert rows[REPO]["last_used"] and rows[REPO]["path"] == str(cache_root / REPO)
    assert rows["other-org/half-model"]["status"] == INCOMPLETE
    assert sb(cache_root, "models", "list") == 0
    table = capsys.readouterr().out
    assert "MODEL" in table and REPO in table and "not downloaded" in table and "never" in table


def test_verify_exit_codes_and_json(hub, cache_root, capsys):
    pulled(cache_root, hub)
    assert sb(cache_root, "models", "verify") == 0
    assert f"ok  {REPO}" in capsys.readouterr().out
    weights = cache_root / REPO / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert sb(cache_root, "models", "verify", REPO, "--json") == 1
    out, err = capsys.readouterr()
    [report] = json.loads(out)
    assert report["problems"][0] == {"path": WEIGHTS, "problem": "corrupt", "detail": "sha256 does not match"}
    assert "models pull" in err
    assert ModelCache(cache_root).status(REPO).status == INCOMPLETE
    assert sb(cache_root, "models", "pull", REPO, "--endpoint", hub.url) == 0
    assert sb(cache_root, "models", "verify", REPO) == 0


def test_rm_needs_confirmation(hub, cache_root, capsys, monkeypatch):
    cache = pulled(cache_root, hub)
    capsys.readouterr()
    assert sb(cache_root, "models", "rm", REPO) == 2  # no TTY, no --force
    assert "--force" in capsys.readouterr().err and cache.status(REPO).status == READY
    monkeypatch.setattr(sys, "stdin", Tty("n\n"))
    assert sb(cache_root, "models", "rm", REPO) == 1 and cache.status(REPO).status == READY
    monkeypatch.setattr(sys, "stdin", Tty("y\n"))
    assert sb(cache_root, "models", "rm", REPO) == 0
    assert cache.status(REPO).status == "not downloaded" and not (cache_root / "test-org").exists()


def test_rm_while_downloading_is_busy(hub, cache_root, capsys):
    cache = pulled(cache_root, hub)
    holder = cache.lock(REPO)
    assert holder.try_acquire()
    try:
        assert sb(cache_root, "models", "rm", REPO, "--force") == 4
    finally:
        holder.release()
    assert "being downloaded" in capsys.readouterr().err and cache.status(REPO).status == READY


def test_cache_list_and_clean(hub, cache_root, capsys, monkeypatch):
    cache = pulled(cache_root, hub)
    stale_partial = cache_root / REPO / PARTIAL_DIR
    stale_partial.mkdir()
    (stale_partial / "old.part").write_bytes(b"x" * 100)
    half = cache_root / "other-org" / "half-model"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"y" * 5000)
    stale_lock = cache_root / ".locks" / "gone-org" / "gone.lock"
    stale_lock.parent.mkdir(parents=True)
    stale_lock.write_text("12345\n")
    capsys.readouterr()

    assert sb(cache_root, "cache", "list", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert {m["model"]: m["status"] for m in listing["models"]} == {"other-org/half-model": INCOMPLETE, REPO: READY}
    assert {x["kind"] for x in listing["leftovers"]} == {"partial download", "stale lock file"}
    assert listing["total_bytes"] >= sum(m["size_bytes"] for m in listing["models"])
    assert sb(cache_root, "cache", "list") == 0
    assert "TOTAL" in capsys.readouterr().out

    assert sb(cache_root, "cache", "clean", "--dry-run") == 0
    err = capsys.readouterr().err
    assert "other-org/half-model" in err and "dry run" in err and half.exists()
    assert sb(cache_root, "cache", "clean") == 2  # no TTY, no --force
    assert half.exists()
    assert sb(cache_root, "cache", "clean", "--force") == 0
    assert not half.exists() and not stale_partial.exists() and not stale_lock.exists()
    assert cache.status(REPO).status == READY and cache.verify(REPO).ok
    capsys.readouterr()
    assert sb(cache_root, "cache", "clean", "--force") == 0
    assert "nothing to clean" in capsys.readouterr().err


def test_cache_clean_one_model(hub, cache_root, capsys):
    cache = pulled(cache_root, hub)
    weights = cache_root / REPO / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # now incomplete
    assert sb(cache_root, "cache", "clean", REPO, "--force") == 0
    assert cache.status(REPO).status == "not downloaded"


def test_cli_module_help_runs_without_heavy_imports():
    code = (
        "import sys; from core.models import cli; "
        "assert 'torch' not in sys.modules and 'huggingface_hub' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    proc = subprocess.run(
        [sys.executable, "-m", "core.models.cli", "models"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "usage" in proc.stderr
