"""Fuzzing every HTTP route and Socket.IO event of one real server (issue 15): over 2,000 generated cases.

Each case is checked as it is answered (tests/fuzzing.py): no 5xx, every error JSON with a code,
Socket.IO errors with scope, code and message, the connection still answering. Afterwards: the
server is alive and logged no traceback, only chats the server said it accepted were stored, and
/healthz, polled from a parallel thread through the whole run, kept its p99 under 200 ms.
benchmarks/fuzz.py runs the same cases ten times over.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_cases import http_requests, raw_frames, socket_events
from tests.fuzzing import Fuzzer, fuzz_server
from tests.helpers import TRACEBACK
from tests.peers.openai_errors_server import ErrorsServer

HTTP_CASES, SOCKET_CASES, FRAME_CASES = 1300, 500, 250
HEALTHZ_P99_S = 0.2


def fuzz_settings(cases: int) -> settings:
    """Deterministic (the same cases every run), no example database, no time limit per case."""
    return settings(
        max_examples=cases, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    with ErrorsServer() as peer:
        server = fuzz_server(tmp_path_factory.mktemp("fuzz"), peer.base_url).start()
        try:
            yield Fuzzer(server)
        finally:
            server.stop()


@pytest.mark.slow
def test_fuzz_every_route_and_event(fuzzer):
    @fuzz_settings(HTTP_CASES)
    @given(http_requests())
    def http(case):
        fuzzer.http_case(case)

    @fuzz_settings(SOCKET_CASES)
    @given(socket_events())
    def events(event):
        fuzzer.socket_case(*event)

    @fuzz_settings(FRAME_CASES)
    @given(raw_frames)
    def frames(frame):
        fuzzer.raw_case(frame)

    with fuzzer.latency:
        http()
        events()
        frames()
    fuzzer.settle()
    report = fuzzer.report()
    print(report)
    assert report["total"] >= 2000, report
    assert fuzzer.server.get("/healthz").ok
    assert not fuzzer.stored_but_refused(), "a refused request stored a chat"
    assert TRACEBACK not in fuzzer.server.log()
    assert report["healthz_samples"] > 100 and not fuzzer.latency.failures
    assert fuzzer.latency.p99() < HEALTHZ_P99_S, report
