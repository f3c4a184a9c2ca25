"""The page's shared helpers (static/ui.js), its layout and its wording, in Chromium against a real server."""

from __future__ import annotations

import re

import pytest

from tests.helpers import BUNDLED_ID, ROOT
from tests.test_browser import browser, send, server, wait_idle  # noqa: F401  (shared fixtures: Chromium, greedy server)

STATIC = ROOT / "static"
PAGE_SCRIPTS = ["app.js", "knowledge.js", "resources.js", "models.js"]


@pytest.fixture
def open_page(browser, server):  # noqa: F811  (fixtures imported above)
    """open_page(width, height) -> a connected page at that window size; page errors are collected."""
    contexts = []

    def open_at(width: int, height: int):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#conn-status').textContent.trim() === 'connected'")
        page.wait_for_function("document.querySelectorAll('#model-select optgroup').length > 0")
        return page

    yield open_at
    for context in contexts:
        context.close()


def widths(page) -> dict:
    return page.evaluate(
        """() => {
          const w = (sel) => document.querySelector(sel).getBoundingClientRect();
          return {prompt: w('#prompt').width, composer: w('#composer').width, send: w('#send').right,
                  page: document.documentElement.scrollWidth, window: window.innerWidth};
        }"""
    )


def test_scripts_share_one_helper_module_and_inject_no_css():
    """Each helper exists once, in ui.js; styles live in CSS files that the page links."""
    html = (ROOT / "templates" / "index.html").read_text()
    scripts = re.findall(r'<script defer src="/static/([^"]+)"', html)
    assert scripts.index("ui.js") < min(scripts.index(name) for name in PAGE_SCRIPTS), scripts
    for css in STATIC.glob("*.css"):
        assert f'href="/static/{css.name}"' in html, f"{css.name} is not linked from index.html"
    own_helper = re.compile(r"function (el|bytes|mb|formatBytes|duration|formatTime|errorText)\s*\(")
    for name in PAGE_SCRIPTS:
        source = (STATIC / name).read_text()
        assert not own_helper.search(source), f"{name} defines its own copy of a ui.js helper"
        assert "window.SwitchboardUI" in source, name
        assert 'createElement("style")' not in source, f"{name} injects CSS"
        # The only inline style left is the message box's height, which follows its content.
        assert re.findall(r"\.style\.(\w+)", source) in ([], ["height", "height"]), name


def test_message_box_spans_the_composer_on_desktop_and_mobile(open_page):
    desktop = widths(open_page(1280, 800))
    assert desktop["prompt"] >= 0.7 * desktop["composer"], desktop
    mobile = widths(open_page(400, 800))
    assert mobile["prompt"] >= 0.7 * mobile["composer"], mobile
    assert mobile["page"] <= mobile["window"] and mobile["send"] <= mobile["window"], mobile


def test_byte_and_memory_wording(open_page):
    page = open_page(1280, 800)
    got = page.evaluate(
        """() => {
          const {bytes, memoryChange, duration, errorText} = window.SwitchboardUI;
          return {
            b: [bytes(512), bytes(1500), bytes(270e6), bytes(2.5e9), bytes(-40e6)],
            m: [memoryChange("RAM", 120e6), memoryChange("RAM", -40e6), memoryChange("RAM", 0),
                memoryChange("RAM", -4096), memoryChange("GPU memory", 2.1e9)],
            d: [duration(42), duration(185), duration(4320), duration(null)],
            e: [errorText({code: "busy", message: "later"}), errorText(null)],
          };
        }"""
    )
    assert got["b"] == ["512 B", "2 kB", "270.0 MB", "2.50 GB", "-40.0 MB"]
    assert got["m"] == [
        "freed RAM 120.0 MB",
        "RAM grew by 40.0 MB",
        "RAM unchanged",
        "RAM unchanged",
        "freed GPU memory 2.10 GB",
    ]
    assert got["d"] == ["42 s", "3 min 5 s", "1 h 12 min", ""]
    assert got["e"] == ["busy: later", "error: something went wrong"]


def test_chat_models_and_resources_panels_render_with_honest_switch_wording(open_page):
    page = open_page(1280, 800)
    assert page.evaluate("typeof window.SwitchboardUI.el") == "function"
    page.wait_for_selector("#models-panel .mdl-row")
    assert "SmolLM2" in page.inner_text("#models-panel .mdl-list")

    page.select_option("#model-select", BUNDLED_ID)
    send(page, "What is the capital of France?")
    wait_idle(page)
    assert "Paris" in page.locator(".message.assistant .content").last.inner_text()

    # The first switch loads the model, so the process grew: the panel says so instead of "freed RAM -270 MB".
    page.wait_for_function(
        "document.querySelector('#resources-panel .res-switch').textContent.includes('last switch')", timeout=15000
    )
    wording = page.inner_text("#resources-panel .res-switch")
    assert "RAM grew by" in wording, wording
    assert not re.search(r"freed [A-Za-z ]+ -", wording), wording
    assert re.search(r"process \d+(\.\d+)? [MG]B", page.inner_text("#resources-panel .res-summary"))
    assert page.errors == []


def test_an_error_of_another_scope_does_not_end_the_answer_streaming(open_page):
    """A failed select_model (or a download's error) arrives while an answer streams: the page shows it,
    and the answer goes on to its end, because every error says what it belongs to."""
    page = open_page(1280, 800)
    page.select_option("#model-select", BUNDLED_ID)
    page.evaluate("window.__errors = []; Switchboard.socket.on('error', (d) => window.__errors.push(d))")
    send(page, "Write a long story about a lighthouse keeper and her cat.")
    page.wait_for_selector(".message.assistant.streaming")
    page.evaluate("Switchboard.socket.emit('select_model', {model: 'nowhere:no-such-model'})")
    page.evaluate("Switchboard.socket.emit('download_model', {model: 'not a repo'})")
    page.wait_for_function("window.__errors.length >= 2", timeout=15000)
    scopes = sorted(e["scope"] for e in page.evaluate("window.__errors"))
    assert scopes == ["download_model", "select_model"], scopes
    assert page.locator(".message.assistant.streaming").count() == 1, "the answer is still streaming"
    assert "model_not_found" in page.inner_text("#messages .error")
    page.click("#stop")
    wait_idle(page)
    last = page.locator(".message.assistant").last
    assert "incomplete" not in last.inner_text(), "the answer was ended by an unrelated error"
    assert last.locator(".meta").count() == 1, "the answer ended with its own done event"
    assert page.errors == []
