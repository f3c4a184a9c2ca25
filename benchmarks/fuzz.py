"""Fuzz one real server with 20,000+ generated requests, events and frames; print what it answered.

The cases and checks of tests/test_fuzz.py (tests/fuzz_cases.py, tests/fuzzing.py), ten times over
and with a fresh random seed each run: HTTP requests to every route, Socket.IO events, raw WebSocket
frames. A case that breaks a property (a 5xx, an error without a code, a Socket.IO connection that
stops answering, a traceback) stops the run with Hypothesis' smallest failing example. At the end:
the server is alive, only accepted chats were stored, and /healthz latency (polled from a parallel
thread the whole run) is reported.

    .venv/bin/python benchmarks/fuzz.py [--http 13000] [--socketio 5000] [--frames 2500]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.fuzz_cases import http_requests, raw_frames, socket_events  # noqa: E402
from tests.fuzzing import Fuzzer, fuzz_server  # noqa: E402
from tests.helpers import TRACEBACK  # noqa: E402
from tests.peers.openai_errors_server import ErrorsServer  # noqa: E402


def run(http_cases: int, socket_cases: int, frame_cases: int) -> dict:
    def fuzz_settings(cases: int) -> settings:
        return settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))

    with ErrorsServer() as peer, tempfile.TemporaryDirectory() as tmp:
        server = fuzz_server(Path(tmp), peer.base_url).start()
        try:
            fuzzer = Fuzzer(server)

            @fuzz_settings(http_cases)
            @given(http_requests())
            def http(case: dict) -> None:
                fuzzer.http_case(case)

            @fuzz_settings(socket_cases)
            @given(socket_events())
            def events(event: tuple) -> None:
                fuzzer.socket_case(*event)

            @fuzz_settings(frame_cases)
            @given(raw_frames)
            def frames(frame: str | bytes) -> None:
                fuzzer.raw_case(frame)

            started = time.monotonic()
            with fuzzer.latency:
                http()
                events()
                frames()
            fuzzer.settle()
            report = fuzzer.report()
            report["seconds"] = round(time.monotonic() - started, 1)
            report["alive"] = server.get("/healthz").ok
            report["stored_but_refused"] = len(fuzzer.stored_but_refused())
            log_text = server.log()
            report["tracebacks_in_log"] = log_text.count(TRACEBACK)
            for at in [i for i in range(len(log_text)) if log_text.startswith(TRACEBACK, i)][:5]:
                print(log_text[max(0, at - 300) : at + 2500], file=sys.stderr)
            report["healthz_failures"] = fuzzer.latency.failures
            return report
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, default=13000)
    parser.add_argument("--socketio", type=int, default=5000)
    parser.add_argument("--frames", type=int, default=2500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = run(args.http, args.socketio, args.frames)
    for key, value in report.items():
        print(f"{key:20} {value}")
    ok = (
        report["alive"]
        and not report["stored_but_refused"]
        and not report["tracebacks_in_log"]
        and not report["healthz_failures"]
        and "5xx" not in report["statuses"]
    )
    print("result              " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
