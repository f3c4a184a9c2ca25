"""The chat page in a real browser: Debian's Chromium driven by Playwright against a real server."""

from __future__ import annotations

import shutil
from urllib.parse import urlparse

import pytest

from tests.helpers import BUNDLED_ID, ServerProcess

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A server whose default sampling is greedy: the page sends no options, and the France answer
    must not depend on the dice (the 135M model sometimes wanders at temperature 0.7)."""
    with ServerProcess(tmp_path_factory.mktemp("browser"), model_dir, env={"SWITCHBOARD_TEMPERATURE": "0"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is not installed: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.foreign_requests = []
    page.on("request", lambda r: urlparse(r.url).hostname != "127.0.0.1" and page.foreign_requests.append(r.url))
    page.on("dialog", lambda d: d.accept())
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#conn-status').textContent.trim() === 'connected'", timeout=15000)
    page.wait_for_function("document.querySelectorAll('#model-select optgroup').length > 0")
    yield page
    context.close()


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def wait_idle(page, timeout: int = 180000) -> None:
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=timeout)


def test_france_question_streams_paris_and_stop_and_reload(page):
    page.select_option("#model-select", BUNDLED_ID)
    disabled = page.eval_on_selector_all("#model-select option:disabled", "os => os.map(o => o.textContent)")
    assert any("not downloaded" in text for text in disabled), disabled

    send(page, "What is the capital of France?")
    page.wait_for_function(
        "document.querySelector('#stop') && !document.querySelector('#stop').disabled", timeout=10000
    )
    wait_idle(page)
    answer = page.locator(".message.assistant .content").last.inner_text()
    assert "Paris" in answer
    assert "tok/s" in page.locator(".message.assistant .meta").last.inner_text()

    send(page, "Write a very long story about a lighthouse keeper, at least 500 words.")
    page.wait_for_function(
        "(() => { const a = [...document.querySelectorAll('.message.assistant .content')].pop();"
        " return a && a.textContent.length > 40; })()",
        timeout=120000,
    )
    page.click("#stop")
    wait_idle(page, 30000)
    last = page.locator(".message.assistant").last
    assert "cancelled" in last.inner_text()

    chat_id = page.evaluate("location.hash.slice(1)")
    page.reload()
    page.wait_for_function(
        f"!!document.querySelector(\"#chat-list .chat-item[data-chat-id='{chat_id}']\")", timeout=15000
    )
    assert page.locator(f"#chat-list .chat-item[data-chat-id='{chat_id}']").count() == 1
    assert page.foreign_requests == []


def test_html_in_a_message_is_shown_as_text_and_runs_nothing(page):
    page.select_option("#model-select", BUNDLED_ID)
    page.evaluate("window.__xss = undefined")
    payload = '<img src=x onerror=alert(1)> <img src=y onerror="window.__xss=1"> reply with one word'
    alerts = []
    page.on("dialog", lambda d: alerts.append(d.message))
    send(page, payload)
    wait_idle(page)
    user = page.locator(".message.user .content").last
    assert user.text_content() == payload
    assert user.locator("img").count() == 0
    assert page.evaluate("window.__xss === undefined")
    assert page.evaluate("!document.querySelector('#messages [onerror], #messages script')")
    assert alerts == []


ZORBLAT = (
    "The Zorblat festival in the town of Quentaria is held every year on the ninth of Brumaire. "
    "Its mascot is a purple walrus called Fenwick, and the winner of the pie contest gets a silver spoon."
)


def test_knowledge_upload_citations_survive_a_reload_and_translate(page):
    page.select_option("#model-select", BUNDLED_ID)
    page.set_input_files(
        "#kb-file", files=[{"name": "zorblat-festival.txt", "mimeType": "text/plain", "buffer": ZORBLAT.encode()}]
    )
    page.click("#kb-upload")
    page.wait_for_selector("#kb-list .kb-doc[data-status='ready']", timeout=120000)
    assert "zorblat-festival.txt" in page.locator("#kb-list").inner_text()

    page.check("#use-knowledge")
    send(page, "What is the name of the mascot of the Zorblat festival?")
    wait_idle(page)
    sources = page.locator(".message.assistant").last.locator(".citations")
    assert "zorblat-festival.txt" in sources.inner_text()

    chat_id = page.evaluate("location.hash.slice(1)")
    page.reload()
    page.wait_for_function(
        f"location.hash.slice(1) === '{chat_id}' && document.querySelectorAll('.message.assistant').length > 0",
        timeout=15000,
    )
    page.wait_for_selector(".message.assistant .citations", timeout=10000)
    assert "zorblat-festival.txt" in page.locator(".message.assistant .citations").last.inner_text(), (
        "citations are stored with the answer, not only sent live"
    )

    page.fill("#tr-text", "Good morning, my friend.")
    page.select_option("#tr-target", "fr")
    page.click("#tr-go")
    page.wait_for_function(
        "document.querySelector('#tr-go').textContent === 'Translate' && "
        "document.querySelector('#tr-output').textContent.trim().length > 0",
        timeout=180000,
    )
    assert "error" not in page.locator(".tr-status").inner_text()
    assert page.foreign_requests == []


def test_reloading_during_an_answer_keeps_streaming_it_in_the_same_bubble(page, server):
    page.select_option("#model-select", BUNDLED_ID)
    send(page, "Write a very long story about a dragon who bakes bread.")
    bubble = ".message.assistant.streaming .content"
    page.wait_for_function(f"(document.querySelector('{bubble}') || {{}}).innerText?.length > 40", timeout=60000)
    before = page.locator(bubble).inner_text()
    page.reload()
    # The chat reopens from the address, its answer still streaming: the page joins it and keeps
    # painting the same bubble (text so far first, then the live pieces), with Stop available.
    page.wait_for_function(
        f"(document.querySelector('{bubble}') || {{}}).innerText?.length > {len(before) + 20}", timeout=60000
    )
    assert page.locator(".message.assistant").count() == 1, "one bubble for the answer, not a second"
    page.click("#stop")  # the joined answer is ours to stop, like any other
    wait_idle(page, timeout=30000)
    final = page.locator(".message.assistant .content").last.inner_text()
    assert final.startswith(before[:30]) and len(final) > len(before) + 20, (before, final)
    assert page.locator(".error").count() == 0, page.locator(".error").all_inner_texts()
    chat_id = page.evaluate("decodeURIComponent(location.hash.slice(1))")
    stored = server.get(f"/api/chats/{chat_id}").json()["messages"][-1]
    assert stored["status"] == "cancelled" and stored["content"].startswith(before[:30])
    assert page.locator(".message.assistant .badge-cancelled").count() == 1
