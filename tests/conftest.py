"""Shared fixtures: the bundled model converted once per machine, and real server processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cluster_harness import cluster_env, redis_server  # noqa: F401  (fixtures: a real Redis, shared state)
from tests.helpers import ServerProcess
from tests.pg_server import postgres_server, postgres_url  # noqa: F401  (fixtures: a real PostgreSQL)

# Converting the bundled GGUF takes ~25 s; keep the result between runs (a fresh machine converts once).
TEST_MODEL_DIR = Path(
    os.environ.get("SWITCHBOARD_TEST_MODEL_DIR", Path.home() / ".cache" / "switchboard" / "test-models")
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still run in CI)")
    config.addinivalue_line("markers", "browser: drives Debian's Chromium through Playwright")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where there is none)")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """A model cache that holds the converted bundled model."""
    from core.models.bundled import ensure_bundled_model
    from core.models.cache import ModelCache

    ensure_bundled_model(ModelCache(TEST_MODEL_DIR))
    return TEST_MODEL_DIR


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real `python run.py` process per test module, with its own data directory."""
    with ServerProcess(tmp_path_factory.mktemp("data"), model_dir) as proc:
        yield proc


@pytest.fixture
def make_server(model_dir: Path, tmp_path: Path):
    """Start extra servers (e.g. to restart one on the same data dir); all stop at test end."""
    started: list[ServerProcess] = []

    def make(data_dir: Path | None = None, **kw) -> ServerProcess:
        proc = ServerProcess(data_dir or tmp_path / "data", model_dir, **kw).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()
