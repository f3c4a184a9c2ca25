"""The resources panel in a real browser: it shows the loaded engine and the last switch, live."""

from __future__ import annotations

import pytest

from tests.helpers import BUNDLED_ID
from tests.test_browser import CHROMIUM, FLAGS, send, wait_idle  # noqa: F401  (shared browser set-up)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_panel_updates_live_after_a_chat_and_an_unload(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#resources-panel .res-summary")
        page.wait_for_function("document.querySelector('#conn-status').textContent.trim() === 'connected'")
        page.select_option("#model-select", BUNDLED_ID)
        send(page, "What is the capital of France?")
        wait_idle(page)
        page.wait_for_function(
            "[...document.querySelectorAll('#resources-panel .res-engine')]"
            ".some(e => e.classList.contains('state-loaded'))",
            timeout=15000,
        )
        assert "SmolLM2" in page.locator("#resources-panel .res-model").first.inner_text()
        assert "last switch" in page.locator("#resources-panel .res-switch").inner_text()
        page.wait_for_function(
            "document.querySelector('#resources-panel .res-estimates').textContent.includes('measured')"
        )
        assert "predicted" in page.locator("#resources-panel .res-estimates").inner_text()
        page.click("#resources-panel .res-unload")
        page.wait_for_function(
            "[...document.querySelectorAll('#resources-panel .res-engine')]"
            ".every(e => e.classList.contains('state-unloaded'))",
            timeout=30000,
        )
        # Picking a model that is not resident shows what switching to it would do (the arbiter's plan).
        page.eval_on_selector("#model-select", "s => s.dispatchEvent(new Event('change'))")
        page.wait_for_function("document.querySelector('#resources-panel .res-plan').textContent.includes('load')")
        plan = page.locator("#resources-panel .res-plan").inner_text()
        assert plan.startswith("switching will") and "free" in plan, plan
        browser.close()
