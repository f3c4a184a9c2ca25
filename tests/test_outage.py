"""The once-per-outage log of background loops: a loop retrying every 2 s against a Redis or database
that stays away writes one warning, then one line when it is back, not one every round."""

from __future__ import annotations

import logging

from core.outage import OutageLog


def test_an_outage_is_logged_once_and_its_end_once(caplog):
    log = logging.getLogger("test.outage")
    outage = OutageLog(log, "thing_unreachable", "thing_back", instance="a1")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.ok()  # healthy from the start: nothing to say
        for _ in range(5):
            outage.failed(ConnectionError("refused"))
        outage.ok()
        outage.ok()
        outage.failed(TimeoutError())
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "event=thing_unreachable instance=a1 error=ConnectionError"),
        ("INFO", "event=thing_back instance=a1"),
        ("WARNING", "event=thing_unreachable instance=a1 error=TimeoutError"),
    ]


def test_a_loop_whose_recovery_another_reports_says_only_the_failure(caplog):
    outage = OutageLog(logging.getLogger("test.outage"), "listener_error")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.failed(OSError("boom: secret-token"))
        outage.ok()
    assert [r.getMessage() for r in caplog.records] == ["event=listener_error error=OSError"]
    assert not outage.failing
