"""The model manager through a real server: Socket.IO downloads with live progress, sharing, cancel,
bad input, delete, and a chat with the model just downloaded (all against a loopback hub); and the
failures every page must hear of: a gated model without a token, a hub that keeps failing, a disk
that fills up mid-download."""

from __future__ import annotations

import errno
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

pytest.register_assert_rewrite("tests.peers.hub_fixtures")  # shared fixtures, see pytest_plugins
from tests.helpers import EVENTS, EventClient, ServerProcess  # noqa: E402
from tests.peers.hub_fixtures import REPO, WEIGHTS  # noqa: E402
from tests.peers.hub_server import HubServer  # noqa: E402

pytest_plugins = ["tests.peers.hub_fixtures"]  # tiny_model

SHARED, SLOW, PAGE = "test-org/tiny-shared", "test-org/tiny-slow", "test-org/tiny-page"
GATED, FLAKY, FULL = "test-org/tiny-gated", "test-org/tiny-flaky", "test-org/tiny-full"
TOGETHER = ("test-org/together-a", "test-org/together-b", "test-org/together-c")
MODEL_EVENTS = (*EVENTS, "download_progress", "download_done", "model_deleted")
NEEDED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    WEIGHTS,
)  # what the downloader fetches (README.md stays on the hub)


@pytest.fixture(scope="module")
def hub(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    for repo in (REPO, SHARED, SLOW, PAGE, GATED, FLAKY, FULL, *TOGETHER):
        shutil.copytree(tiny_model, root / repo)
        # the generated tokenizer has no chat template; a real chat model ships one
        (root / repo / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    hub = HubServer(root).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def srv(hub: HubServer, tmp_path_factory: pytest.TempPathFactory):
    env = {
        "SWITCHBOARD_HF_ENDPOINTS": hub.url,
        "HF_ENDPOINT": hub.url,
        "SWITCHBOARD_PREPARE_BUNDLED": "0",
        "SWITCHBOARD_DOWNLOAD_RETRY_DELAY": "0.05",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "",  # no token, from the environment or a saved login
        "HF_HOME": str(tmp_path_factory.mktemp("hf-home")),
    }
    models = tmp_path_factory.mktemp("models")  # not the shared test model cache
    with ServerProcess(tmp_path_factory.mktemp("data"), models, env=env) as proc:
        yield proc


@pytest.fixture()
def clients(srv: ServerProcess, hub: HubServer):
    made: list[EventClient] = []

    def make() -> EventClient:
        made.append(EventClient(srv.url, MODEL_EVENTS))
        return made[-1]

    yield make
    for client in made:
        client.close()
    hub.reset()


def post(srv: ServerProcess, path: str, body: object) -> requests.Response:
    return requests.post(srv.url + path, json=body, timeout=10)


def row(srv: ServerProcess, repo: str) -> dict:
    rows = srv.get("/api/cache/models").json()["models"]
    return next(r for r in rows if r["model"] == repo)


def local_model(payload: dict, repo: str) -> dict | None:
    return next((m for g in payload["groups"] for m in g["models"] if m["id"] == f"local:{repo}"), None)


def test_download_streams_progress_to_every_page_then_the_model_chats(srv, hub, clients):
    hub.throttle = 1_500_000  # ~1 s for the weights: several progress events
    asker, watcher = clients(), clients()
    asker.emit("download_model", {"model": REPO})
    for client in (asker, watcher):
        client.wait_event("download_done", timeout=30, model=REPO)
    total = sum((hub.root / REPO / name).stat().st_size for name in NEEDED)
    for client in (asker, watcher):
        progress = [d for d in client.of("download_progress") if d["model"] == REPO]
        sizes = [p["bytes"] for p in progress]
        assert len(progress) >= 3 and sizes == sorted(sizes)
        assert progress[-1]["bytes"] == progress[-1]["total"] == total
        assert progress[-1]["files_done"] == progress[-1]["files_total"] == len(NEEDED)
        assert set(progress[-1]) >= {"model", "bytes", "total", "files_done", "files_total", "speed", "eta"}
        times = [t for t, name, d in client.events if name == "download_progress"]
        assert len(times) <= 2 + 5 * (times[-1] - times[0])  # throttled to ~4 events/s
        start = client.wait_event("download_done", model=REPO)[0]
        _, _, _, models = client.wait_for(lambda n, d: n == "models" and local_model(d, REPO), 15, start)
        assert local_model(models, REPO)["available"]
    assert len([e for e in hub.transfers(WEIGHTS) if REPO in e["path"]]) == 1, "one copy of the weights"
    listed = row(srv, REPO)
    assert listed["status"] == "ready" and listed["size_bytes"] >= total and not listed["downloading"]
    assert listed["path"] == str(srv.model_dir / REPO)

    asker.emit(
        "chat", {"model": f"local:{REPO}", "content": "w1 w2 w3", "options": {"temperature": 0, "max_new_tokens": 8}}
    )
    _, _, name, end = asker.wait_end(timeout=60)
    assert name == "done", end
    assert "".join(d["content"] for d in asker.of("delta", end["chat_id"])).strip()
    assert row(srv, REPO)["loaded"]
    gone = requests.delete(f"{srv.url}/api/cache/models/{REPO}", timeout=30)
    assert gone.status_code == 200 and gone.json()["unloaded"]  # the idle engine is unloaded, then deleted
    assert not (srv.model_dir / REPO).exists()
    start = watcher.wait_event("model_deleted", timeout=10, model=REPO)[0]
    watcher.wait_for(lambda n, d: n == "models" and not (local_model(d, REPO) or {}).get("available"), 15, start)


def test_two_clients_share_one_download(srv, hub, clients):
    hub.throttle = 2_000_000
    first, second = clients(), clients()
    first.emit("download_model", {"model": SHARED})
    first.wait_event("download_progress", timeout=10, model=SHARED)
    second.emit("download_model", {"model": f"local:{SHARED}"})
    joined = post(srv, "/api/models/download", {"model": SHARED})
    assert joined.status_code == 202 and joined.json()["state"] == "joined"
    for client in (first, second):
        client.wait_event("download_done", timeout=30, model=SHARED)
    time.sleep(0.3)
    for client in (first, second):
        assert len([d for d in client.of("download_done") if d["model"] == SHARED]) == 1
    weights = [e for e in hub.transfers(WEIGHTS) if SHARED in e["path"]]
    assert len(weights) == 1 and hub.bytes_served(SHARED) < 1.1 * sum(
        (hub.root / SHARED / name).stat().st_size for name in NEEDED
    )  # one copy of the bytes


def test_cancel_keeps_the_partial_and_delete_waits_for_the_download(srv, hub, clients):
    hub.throttle = 300_000
    watcher = clients()
    started = post(srv, "/api/models/download", {"model": SLOW})
    assert started.status_code == 202 and started.json()["state"] == "started"
    watcher.wait_for(lambda n, d: n == "download_progress" and d["model"] == SLOW and d["bytes"] > 100_000, 15)
    assert srv.get("/healthz", timeout=5).ok  # the server answers while a download runs
    assert row(srv, SLOW)["downloading"] and row(srv, SLOW)["progress"]["bytes"] > 0
    busy = requests.delete(f"{srv.url}/api/cache/models/{SLOW}", timeout=10)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "busy"
    assert post(srv, "/api/models/download/cancel", {"model": SLOW}).status_code == 202
    _, _, _, err = watcher.wait_event("error", timeout=10, model=SLOW)
    assert err["code"] == "cancelled"
    part = srv.model_dir / SLOW / ".partial" / f"{WEIGHTS}.part"
    assert part.stat().st_size > 100_000  # kept for a resume
    listed = row(srv, SLOW)
    assert listed["status"] == "incomplete" and not listed["downloading"] and listed["error"]["code"] == "cancelled"
    again = post(srv, "/api/models/download/cancel", {"model": SLOW})
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
    gone = requests.delete(f"{srv.url}/api/cache/models/{SLOW}", timeout=10)
    assert gone.status_code == 200 and gone.json()["bytes_freed"] > 100_000
    assert not (srv.model_dir / SLOW).exists()
    watcher.wait_event("model_deleted", timeout=10, model=SLOW)
    assert requests.delete(f"{srv.url}/api/cache/models/{SLOW}", timeout=10).status_code == 404


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b/c", "bad name", "org/..", "", "org/x\x00y"])
def test_bad_names_are_refused_before_touching_the_disk(srv, hub, clients, name):
    before = sorted(p.relative_to(srv.model_dir) for p in srv.model_dir.rglob("*"))
    answer = post(srv, "/api/models/download", {"model": name})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request"
    client = clients()
    client.emit("download_model", {"model": name})
    _, _, _, err = client.wait_event("error", timeout=10)
    assert err["code"] == "bad_request" and err["model"] == name
    assert sorted(p.relative_to(srv.model_dir) for p in srv.model_dir.rglob("*")) == before
    assert hub.requests() == []


def test_unknown_repo_is_a_clear_error_to_every_page(srv, hub, clients):
    asker, watcher = clients(), clients()
    asker.emit("download_model", {"model": "test-org/does-not-exist"})
    for client in (asker, watcher):
        _, _, _, err = client.wait_event("error", timeout=15, model="test-org/does-not-exist")
        assert err["code"] == "model_not_found" and "not found" in err["message"]
    assert not (srv.model_dir / "test-org" / "does-not-exist").exists()
    assert post(srv, "/api/models/download", {}).status_code == 400


def test_several_models_download_at_once(hub, tmp_path):
    """Each download runs in its own OS thread; together they must not share a green lock (a fresh server,
    so the hub client is created while they race)."""
    env = {"SWITCHBOARD_HF_ENDPOINTS": hub.url, "SWITCHBOARD_PREPARE_BUNDLED": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with ServerProcess(tmp_path / "data", tmp_path / "models", env=env) as server:
        client = EventClient(server.url, MODEL_EVENTS)
        try:
            for repo in TOGETHER:
                assert post(server, "/api/models/download", {"model": repo}).json()["state"] == "started"
            for repo in TOGETHER:
                _, _, name, end = client.wait_for(
                    lambda n, d, repo=repo: n in ("download_done", "error") and d.get("model") == repo, timeout=30
                )
                assert name == "download_done", end
            assert all(row(server, repo)["status"] == "ready" for repo in TOGETHER)
        finally:
            client.close()
    assert "greenlet.error" not in server.log()


def test_a_gated_model_without_a_token_is_auth_failed_for_every_page(srv, hub, clients):
    hub.gated = {GATED: {"hf_someone_elses_token"}}
    asker, watcher = clients(), clients()
    asker.emit("download_model", {"model": GATED})
    for client in (asker, watcher):
        _, _, _, err = client.wait_event("error", timeout=15, model=GATED)
        assert err["code"] == "auth_failed" and "gated" in err["message"] and "HF_TOKEN" in err["message"]
    listed = row(srv, GATED)
    assert listed["error"]["code"] == "auth_failed" and not listed["downloading"]


def test_a_hub_that_keeps_failing_is_download_failed_for_every_page(srv, hub, clients):
    hub.fail = {"status": 503, "match": FLAKY}
    asker, watcher = clients(), clients()
    answer = post(srv, "/api/models/download", {"model": FLAKY})
    assert answer.status_code == 202 and answer.json()["state"] == "started"
    for client in (asker, watcher):
        _, _, _, err = client.wait_event("error", timeout=30, model=FLAKY)
        assert err["code"] == "download_failed" and hub.url in err["message"] and "HTTP 503" in err["message"]
    assert row(srv, FLAKY)["error"]["code"] == "download_failed"
    assert len(hub.requests(contains=FLAKY)) == 3, "three tries at the one endpoint, then the error"


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 6 MiB tmpfs: room for the tiny model, and a disk a test can fill up for real."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (the tests run as root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_a_disk_that_fills_up_mid_download_is_storage_error_and_the_download_resumes(hub, small_disk, tmp_path):
    env = {"SWITCHBOARD_HF_ENDPOINTS": hub.url, "SWITCHBOARD_PREPARE_BUNDLED": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    hub.throttle = 300_000
    with ServerProcess(tmp_path / "data", small_disk, env=env) as server:
        client = EventClient(server.url, MODEL_EVENTS)
        try:
            assert post(server, "/api/models/download", {"model": FULL}).status_code == 202
            client.wait_for(
                lambda n, d: n == "download_progress" and d["model"] == FULL and d["file"] == WEIGHTS and d["bytes"],
                timeout=30,
            )
            filler = fill(small_disk)
            _, _, _, err = client.wait_event("error", timeout=30, model=FULL)
            assert err["code"] == "storage_error" and "disk full" in err["message"] and "kept" in err["message"]
            part = small_disk / FULL / ".partial" / f"{WEIGHTS}.part"
            kept = part.stat().st_size
            assert kept > 0, "the partial download is kept for a resume"
            assert row(server, FULL)["error"]["code"] == "storage_error"

            filler.unlink()
            hub.throttle = None
            start = len(client.events)
            assert post(server, "/api/models/download", {"model": FULL}).status_code == 202
            client.wait_event("download_done", timeout=30, start=start, model=FULL)
            resumed = [e for e in hub.transfers(WEIGHTS) if FULL in e["path"]][-1]
            assert resumed["range"] == f"bytes={kept}-" and resumed["status"] == 206
            assert row(server, FULL)["status"] == "ready"
        finally:
            client.close()
            hub.reset()


@pytest.mark.browser
def test_the_models_panel_downloads_cancels_resumes_and_deletes(srv, hub):
    # A missing browser fails the suite, as in tests/test_browser.py: it must never pass unnoticed.
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, FLAGS

    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is not installed: run `make browser` (apt-get install chromium)")
    hub.throttle = 300_000
    row, option = f'#models-panel .mdl-row[data-model="{PAGE}"]', f'#model-select option[value="local:{PAGE}"]'
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
            page.goto(srv.url + "/")
            page.wait_for_selector("#models-panel .mdl-row")
            page.fill("#models-panel .mdl-form input", "../x")
            page.click("#models-panel .mdl-form button")
            page.wait_for_selector("#models-panel .mdl-form + .mdl-error:not([hidden])")
            assert "bad_request" in page.inner_text("#models-panel .mdl-form + .mdl-error")
            page.fill("#models-panel .mdl-form input", PAGE)
            page.click("#models-panel .mdl-form button")
            page.wait_for_function(f"(document.querySelector('{row} .mdl-bar') || {{}}).value > 100000", timeout=15000)
            assert "/s" in page.inner_text(f"{row} .mdl-rate")  # speed (and ETA) beside the bar
            page.click(f"{row} button:has-text('Cancel')")
            page.wait_for_selector(f"{row} .mdl-error:has-text('cancelled')", timeout=10000)
            hub.throttle = None
            page.click(f"{row} button:has-text('Resume')")
            page.wait_for_selector(f"{row} .st-ready", timeout=15000)
            page.wait_for_function(
                f"document.querySelector('{option}') && !document.querySelector('{option}').disabled", timeout=10000
            )  # the dropdown got the model without a reload
            page.click(f"{row} button:has-text('Delete')")
            page.wait_for_function(
                f"!document.querySelector('{row}') && !document.querySelector('{option}')", timeout=10000
            )
            assert dialogs and PAGE in dialogs[0] and not (srv.model_dir / PAGE).exists()
            browser.close()
    finally:
        hub.reset()


@pytest.mark.slow
def test_every_page_hears_when_the_bundled_model_is_ready(tmp_path: Path):
    """On a first start the dropdown says "preparing"; when the conversion ends every client gets a fresh
    `models` payload, so the page does not keep saying it until a reload."""
    from tests.helpers import BUNDLED_ID

    env = {"SWITCHBOARD_BUNDLED_RUNTIME": "transformers"}  # the runtime that needs the conversion
    with ServerProcess(tmp_path / "data", tmp_path / "fresh-models", env=env) as srv:
        client = EventClient(srv.url)
        try:
            client.emit("list_models", {})

            def bundled(payload: dict) -> dict:
                return next(m for g in payload["groups"] for m in g["models"] if m["id"] == BUNDLED_ID)

            _, _, _, first = client.wait_event("models", timeout=30)
            assert (bundled(first)["reason"] or "").startswith("preparing"), bundled(first)
            _, _, _, ready = client.wait_for(
                lambda name, data: name == "models" and bundled(data)["reason"] is None, timeout=300
            )
            assert bundled(ready)["available"] and bundled(ready)["details"]["status"] == "ready"
        finally:
            client.close()
