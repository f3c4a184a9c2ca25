"""Downloads against a real loopback hub: resume, fallback, sharing, integrity, bad input."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.errors import AuthFailed, BadRequest, Busy, ModelNotFound
from core.models import downloads
from core.models.cache import INCOMPLETE, PARTIAL_DIR, READY, ModelCache
from core.models.downloads import DownloadCancelled, DownloadError, DownloadManager, StorageError, select_files

pytest.register_assert_rewrite("tests.peers.hub_fixtures")  # shared fixtures, see pytest_plugins
from tests.peers.hub_fixtures import REPO, WEIGHTS, dead_endpoint, weights_size  # noqa: E402
from tests.peers.hub_server import HubServer  # noqa: E402

pytest_plugins = ["tests.peers.hub_fixtures"]  # tiny_model, hub_root, hub, hub2, cache_root

ROOT = Path(__file__).resolve().parent.parent


def manager(cache_root: Path, *endpoints: str, **kw) -> DownloadManager:
    kw.setdefault("retry_delay", 0.02)
    return DownloadManager(cache_root, list(endpoints), **kw)


def weight_gets(hub: HubServer) -> list[dict]:
    """The GETs that carried the weights' bytes (from the hub's CDN: /resolve/ redirects there)."""
    return hub.transfers(WEIGHTS)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_download_loads_and_generates_then_second_pull_transfers_nothing(hub, cache_root, hub_root):
    progress, done = [], []
    result = manager(cache_root, hub.url).pull(REPO, on_progress=progress.append, on_done=done.append)
    cache = ModelCache(cache_root)
    assert cache.status(REPO).status == READY
    manifest = cache.read_manifest(REPO)
    names = {f["path"] for f in manifest["files"]}
    assert {"config.json", "tokenizer.json", WEIGHTS} <= names and "README.md" not in names
    weights = next(f for f in manifest["files"] if f["path"] == WEIGHTS)
    assert weights["sha256"] == sha256(hub_root / REPO / WEIGHTS)
    assert not (cache_root / REPO / PARTIAL_DIR).exists()
    assert progress[-1]["bytes"] == progress[-1]["total"] == result.total_bytes
    assert progress[-1]["files_done"] == progress[-1]["files_total"] == result.files
    assert set(progress[-1]) >= {"model", "bytes", "total", "files_done", "files_total", "speed", "eta"}
    assert done[0]["model"] == REPO and done[0]["path"] == str(cache_root / REPO)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cache_root / REPO)
    tokenizer = AutoTokenizer.from_pretrained(cache_root / REPO)
    inputs = tokenizer("w1 w2 w3", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4

    hub.reset()
    again = manager(cache_root, hub.url).pull(REPO)
    assert again.already_present and again.downloaded_bytes == 0
    assert hub.requests() == [], "a complete model costs no request at all"


def test_dropped_connection_resumes_with_a_range_request(hub, cache_root, hub_root):
    size = weights_size(hub_root)
    hub.cut_after[WEIGHTS] = [size // 2]
    manager(cache_root, hub.url).pull(REPO)
    gets = weight_gets(hub)
    assert len(gets) == 2 and gets[0]["range"] is None
    offset = int(gets[1]["range"].split("=")[1].rstrip("-"))
    assert 0 < offset <= size // 2 and gets[1]["status"] == 206
    assert hub.bytes_served(WEIGHTS) < size * 1.1  # about one copy, not two
    assert sha256(cache_root / REPO / WEIGHTS) == sha256(hub_root / REPO / WEIGHTS)


def test_weights_come_from_another_host_without_the_token_and_resume_there(hub, cache_root, hub_root, monkeypatch):
    """The hub redirects weights to a storage host: the token must stay behind, the Range must not."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
    size = weights_size(hub_root)
    hub.cut_after[WEIGHTS] = [size // 3]
    manager(cache_root, hub.url).pull(REPO)
    redirects = [e for e in hub.requests("GET", "/resolve/") if e["path"].endswith(WEIGHTS)]
    assert [e["status"] for e in redirects] == [302, 302] and redirects[0]["auth"] == "Bearer hf_secret_test_token"
    gets = weight_gets(hub)
    assert [e["host"] for e in gets] == ["cdn", "cdn"] and all(e["auth"] is None for e in gets)
    offset = int(gets[1]["range"].split("=")[1].rstrip("-"))
    assert 0 < offset <= gets[0]["bytes"] and gets[1]["status"] == 206
    assert hub.bytes_served(WEIGHTS) < size * 1.1
    assert sha256(cache_root / REPO / WEIGHTS) == sha256(hub_root / REPO / WEIGHTS)


def test_a_server_that_ignores_range_makes_the_file_start_over(hub, cache_root, hub_root):
    size = weights_size(hub_root)
    hub.ignore_range = True
    hub.cut_after[WEIGHTS] = [size // 2]
    manager(cache_root, hub.url).pull(REPO)
    gets = weight_gets(hub)
    assert len(gets) == 2 and gets[1]["range"] and gets[1]["status"] == 200, gets
    assert gets[1]["bytes"] == size, "the whole file came again, and was written from its start"
    assert sha256(cache_root / REPO / WEIGHTS) == sha256(hub_root / REPO / WEIGHTS)
    assert ModelCache(cache_root).verify(REPO).ok


def test_a_mirror_with_a_short_copy_answers_416_and_the_next_endpoint_serves_the_file(hub, hub2, cache_root, hub_root):
    """A broken mirror advertises the full size but holds a shorter object: resuming past its end is a 416."""
    hub.truncate = {WEIGHTS: weights_size(hub_root) // 2}
    result = manager(cache_root, hub.url, hub2.url).pull(REPO)
    assert 416 in [e["status"] for e in weight_gets(hub)]
    assert result.source == hub2.url
    assert sha256(cache_root / REPO / WEIGHTS) == sha256(hub_root / REPO / WEIGHTS)


def test_a_gated_model_needs_a_token_with_access(hub, cache_root, hub_root, monkeypatch):
    hub.gated = {REPO: {"hf_granted_token"}}
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(cache_root.parent / "hf-home"))  # no saved `hf auth login` token either
    with pytest.raises(AuthFailed, match="gated"):
        manager(cache_root, hub.url).pull(REPO)
    assert [e["status"] for e in hub.requests("HEAD", "/resolve/")] == [401]
    monkeypatch.setenv("HF_TOKEN", "hf_other_token")
    with pytest.raises(AuthFailed, match="gated"):
        manager(cache_root, hub.url).pull(REPO)
    assert hub.requests("HEAD", "/resolve/")[-1]["status"] == 403
    monkeypatch.setenv("HF_TOKEN", "hf_granted_token")
    manager(cache_root, hub.url).pull(REPO)
    assert ModelCache(cache_root).status(REPO).status == READY
    assert all(e["auth"] is None for e in weight_gets(hub)), "the CDN never sees the hub token"


def test_killed_download_process_resumes_after_restart(cache_root, hub_root, tmp_path):
    """`python -m core.models.cli models pull` is SIGKILLed mid-file; a second run resumes from the .part file."""
    proc = subprocess.Popen(
        [sys.executable, "tests/peers/hub_server.py", "--port", "0", "--root", str(hub_root)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split()[1]
        control = lambda **body: _post(f"{url}/_control", body)  # noqa: E731
        control(throttle=300_000)
        env = dict(
            os.environ,
            SWITCHBOARD_DATA_DIR=str(tmp_path / "data"),
            SWITCHBOARD_DOWNLOAD_RETRY_DELAY="0.05",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        cmd = [
            sys.executable,
            "-m",
            "core.models.cli",
            "--model-dir",
            str(cache_root),
            "models",
            "pull",
            REPO,
            "--endpoint",
            url,
        ]
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        part = cache_root / REPO / PARTIAL_DIR / f"{WEIGHTS}.part"
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size > 200_000):
            assert time.monotonic() < deadline and first.poll() is None, "download never got going"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        kept = part.stat().st_size
        assert ModelCache(cache_root).status(REPO).status == INCOMPLETE
        control(throttle=None)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == str(cache_root / REPO)
        log = json.loads(_get(f"{url}/_log"))
        gets = [e for e in log if e["method"] == "GET" and e["path"].endswith(WEIGHTS)]
        assert gets[-1]["range"] == f"bytes={kept}-"
        size = weights_size(hub_root)
        assert sum(e["bytes"] for e in gets) < size * 1.2  # one copy plus what was in flight at the kill
        assert ModelCache(cache_root).status(REPO).status == READY
    finally:
        proc.kill()
        proc.wait()


def test_first_endpoint_5xx_falls_back_to_the_second(hub, hub2, cache_root, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
    hub.fail = {"status": 503}
    result = manager(cache_root, hub.url, hub2.url).pull(REPO)
    assert result.source == hub2.url
    assert len(hub.requests()) == 3  # three tries, then the mirror
    assert hub.requests()[0]["auth"] == "Bearer hf_secret_test_token"  # the primary gets the token...
    assert all(e["auth"] is None for e in hub2.requests())  # ...a fallback mirror never does
    assert ModelCache(cache_root).read_manifest(REPO)["source"] == hub2.url


def test_all_endpoints_failing_reports_what_was_tried(hub, cache_root):
    hub.fail = {"status": 502}
    dead = dead_endpoint()
    with pytest.raises(DownloadError) as info:
        manager(cache_root, hub.url, dead).pull(REPO)
    message = info.value.message
    assert hub.url in message and "HTTP 502" in message and dead in message and "3 tries" in message


def test_connection_cut_on_every_try_moves_to_the_mirror(hub, hub2, cache_root, hub_root):
    hub.cut_after[WEIGHTS] = [0] * 5  # headers, then nothing: no progress, so tries count
    result = manager(cache_root, hub.url, hub2.url).pull(REPO)
    assert result.source == hub2.url and len(weight_gets(hub)) == 3
    assert sha256(cache_root / REPO / WEIGHTS) == sha256(hub_root / REPO / WEIGHTS)


def test_optional_file_missing_on_the_hub_is_skipped(hub, cache_root):
    hub.fail = {"status": 404, "match": "generation_config.json", "error_code": "EntryNotFound"}
    manager(cache_root, hub.url).pull(REPO)
    cache = ModelCache(cache_root)
    assert cache.status(REPO).status == READY
    assert "generation_config.json" not in {f["path"] for f in cache.read_manifest(REPO)["files"]}


def test_verify_finds_truncated_and_corrupt_weights_and_pull_repairs(hub, cache_root, hub_root):
    cache, mgr = ModelCache(cache_root), manager(cache_root, hub.url)
    mgr.pull(REPO)
    weights, size = cache_root / REPO / WEIGHTS, weights_size(hub_root)
    good = weights.read_bytes()
    weights.write_bytes(good[: size // 3])
    assert cache.status(REPO).status == INCOMPLETE
    assert [p["problem"] for p in cache.verify(REPO).problems] == ["truncated"]
    hub.reset()
    mgr.pull(REPO)
    assert weight_gets(hub)[-1]["range"] == f"bytes={size // 3}-"  # the truncated file was the resume seed
    assert cache.verify(REPO).ok and cache.status(REPO).status == READY

    weights.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])  # same size, one byte changed
    report = cache.verify(REPO)
    assert [(p["path"], p["problem"]) for p in report.problems] == [(WEIGHTS, "corrupt")]
    assert cache.status(REPO).status == INCOMPLETE  # verify marked it; it is never loaded now
    hub.reset()
    mgr.pull(REPO)
    assert [e["path"].rsplit("/", 1)[1] for e in hub.requests("GET", "/resolve/")] == [WEIGHTS]
    assert weights.read_bytes() == good and cache.verify(REPO).ok


def test_presence_check_stats_the_files_and_reads_none(hub, cache_root):
    """docs/models.md: ready = the manifest plus every listed file on disk with its size (a stat per file, no
    hashing; `models verify` hashes). What keeps it fast is that it never reads a file, so assert that."""
    cache = ModelCache(cache_root)
    manager(cache_root, hub.url).pull(REPO)
    weights = cache_root / REPO / WEIGHTS
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, other bytes: only a hash could tell
    assert cache.status(REPO).status == READY
    assert [p["problem"] for p in cache.verify(REPO).problems] == ["corrupt"], "verify is what reads the bytes"
    manager(cache_root, hub.url).pull(REPO)  # repairs it
    weights.write_bytes(weights.read_bytes()[:-1])
    assert cache.status(REPO).status == INCOMPLETE and WEIGHTS in cache.status(REPO).reason
    (cache_root / REPO / "config.json").unlink()
    assert cache.status(REPO).status == INCOMPLETE


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "/etc/passwd",
        "org/../../x",
        "org/..",
        "a/b/c",
        "org/na me",
        "org/.hidden",
        "..",
        "",
        "org/",
        "org/x\x00y",
    ],
)
def test_bad_names_are_rejected_before_touching_disk_or_network(hub, cache_root, name):
    with pytest.raises(BadRequest):
        manager(cache_root, hub.url).start(name)
    assert list(cache_root.iterdir()) == [] and hub.requests() == []


def test_unknown_repo_is_a_clear_not_found(hub, cache_root):
    with pytest.raises(ModelNotFound) as info:
        manager(cache_root, hub.url).pull("test-org/does-not-exist")
    assert "test-org/does-not-exist" in info.value.message and "not found" in info.value.message
    assert not (cache_root / "test-org" / "does-not-exist").exists()


def test_two_requests_share_one_download(hub, cache_root, hub_root):
    hub.throttle = 4_000_000
    mgr = manager(cache_root, hub.url)
    done: list[dict] = []
    first = mgr.start(REPO, on_done=done.append)
    second = manager(cache_root, hub.url).start(REPO, on_done=done.append)
    assert first is second and mgr.running() == [REPO]
    first.wait(30)
    assert len(done) == 2 and len(weight_gets(hub)) == 1


def test_a_held_lock_means_busy_or_wait(hub, cache_root):
    cache = ModelCache(cache_root)
    other = cache.lock(REPO)  # flock is per open file: this behaves like another process holding it
    assert other.try_acquire()
    with pytest.raises(Busy, match="already downloading"):
        manager(cache_root, hub.url, wait_for_lock=False).pull(REPO)
    events: list[dict] = []
    job = manager(cache_root, hub.url).start(REPO, on_progress=events.append)
    time.sleep(0.3)
    assert not job.done.is_set() and events[0]["state"] == "waiting"
    other.release()
    assert job.wait(30).files == 5 and cache.status(REPO).status == READY


def test_cancel_keeps_the_partial_file_for_a_resume(hub, cache_root, hub_root):
    hub.throttle = 400_000
    cancel = threading.Event()
    job = manager(cache_root, hub.url).start(REPO, cancel=cancel)
    part = cache_root / REPO / PARTIAL_DIR / f"{WEIGHTS}.part"
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size > 100_000):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancel.set()
    with pytest.raises(DownloadCancelled):
        job.wait(10)
    kept = part.stat().st_size
    assert ModelCache(cache_root).status(REPO).status == INCOMPLETE
    hub.reset()
    manager(cache_root, hub.url).pull(REPO)
    assert weight_gets(hub)[-1]["range"] == f"bytes={kept}-"


def test_disk_full_is_a_clear_error_and_keeps_the_partial(hub, cache_root, monkeypatch):
    real_open = builtins.open

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            if self.written + len(data) > 300_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        return FullDisk(fh) if str(path).endswith(f"{WEIGHTS}.part") and "b" in mode and "r" not in mode else fh

    monkeypatch.setattr(downloads, "open", fake_open, raising=False)
    with pytest.raises(StorageError, match="disk full") as info:
        manager(cache_root, hub.url).pull(REPO)
    assert "kept" in info.value.message
    kept = (cache_root / REPO / PARTIAL_DIR / f"{WEIGHTS}.part").stat().st_size
    assert 0 < kept <= 300_000
    monkeypatch.undo()
    hub.reset()
    manager(cache_root, hub.url).pull(REPO)
    assert weight_gets(hub)[0]["range"] == f"bytes={kept}-"
    assert ModelCache(cache_root).verify(REPO).ok


def test_permission_denied_is_a_clear_error(hub, cache_root, monkeypatch):
    real_open = builtins.open

    def fake_open(path, mode="r", *a, **kw):
        if str(path).endswith(f"{WEIGHTS}.part") and "r" not in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(downloads, "open", fake_open, raising=False)
    with pytest.raises(StorageError, match="Permission denied") as info:
        manager(cache_root, hub.url).pull(REPO)
    assert "MODEL_DIR" in info.value.message and f"{WEIGHTS}.part" in info.value.message
    assert (cache_root / REPO / "config.json").is_file()  # what was fetched stays for the next pull


def test_not_enough_free_space_fails_before_downloading(hub, cache_root, monkeypatch):
    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=0, free=1000))
    with pytest.raises(StorageError, match="not enough disk space"):
        manager(cache_root, hub.url).pull(REPO)
    assert weight_gets(hub) == []


def test_a_file_changed_upstream_discards_the_stale_partial(hub, cache_root, hub_root):
    hub.cut_after[WEIGHTS] = [200_000]
    with pytest.raises(DownloadError):
        manager(cache_root, hub.url, retries=1).pull(REPO)
    weights = hub_root / REPO / WEIGHTS
    weights.write_bytes(os.urandom(weights.stat().st_size))  # a new commit with different weights
    hub.reset()
    manager(cache_root, hub.url).pull(REPO)
    assert weight_gets(hub)[0]["range"] is None
    assert sha256(cache_root / REPO / WEIGHTS) == sha256(weights)


def test_file_selection_prefers_safetensors():
    names = [
        "config.json",
        "README.md",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "tokenizer.json",
        "onnx/model.onnx",
        "training_args.bin",
        "../evil.json",
    ]
    chosen = dict(select_files("o/n", names))
    assert set(chosen) == {
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    }
    assert chosen["config.json"] and not chosen["tokenizer.json"]
    fallback = dict(select_files("o/n", ["config.json", "pytorch_model.bin", "training_args.bin", "tokenizer.json"]))
    assert set(fallback) == {"config.json", "pytorch_model.bin", "tokenizer.json"}
    with pytest.raises(BadRequest):
        select_files("o/n", ["config.json", "model.gguf"])


def test_the_hub_speaks_enough_for_huggingface_hub_itself(hub, tmp_path):
    from huggingface_hub import snapshot_download

    path = snapshot_download(REPO, endpoint=hub.url, local_dir=tmp_path / "snap")
    assert (Path(path) / WEIGHTS).is_file() and (Path(path) / "README.md").is_file()


def _post(url: str, body: dict) -> bytes:
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()
