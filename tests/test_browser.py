"""The page in a real browser (Debian's chromium via Playwright): send, watch it stream, Stop, upload an image,
and HTML in a message shown as text, never run."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture
def page(launched):
    from playwright.sync_api import sync_playwright

    url, engines, st = launched
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page()
        pg.set_default_timeout(20_000)
        pg.goto(url)
        pg.wait_for_selector("#chat-input textarea")
        pg.wait_for_selector("#chat-send:not([disabled])")
        pg.wait_for_timeout(500)  # let the first status refresh land before typing
        yield pg, engines
        browser.close()


def bot_text(pg, chatbot="#chatbot") -> str:
    bots = pg.locator(f"{chatbot} .message-row.bot-row, {chatbot} [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def send(pg, text: str) -> None:
    """Type like a user and press Send once the box holds the text."""
    box = pg.locator("#chat-input textarea")
    box.fill(text)
    pg.wait_for_function("t => document.querySelector('#chat-input textarea').value === t", arg=text)
    pg.wait_for_timeout(150)
    pg.click("#chat-send")


def test_send_stream_stop(page):
    pg, (text, _) = page
    text.delay_s = 0.05
    text.enqueue(" ".join(f"word{i}" for i in range(300)))
    send(pg, "Tell me a long story")
    pg.wait_for_function("document.querySelector('#chatbot')?.innerText?.includes('word5')")
    first = bot_text(pg)
    pg.wait_for_function("document.querySelector('#chatbot')?.innerText?.includes('word15')")
    assert len(bot_text(pg)) > len(first), "the reply did not stream"
    pg.click("#chat-stop")
    pg.wait_for_timeout(800)
    stopped_at = bot_text(pg)
    pg.wait_for_timeout(800)
    assert bot_text(pg) == stopped_at and "word299" not in stopped_at
    assert text.stopped and text.active_sessions() == 0
    assert "stopped" in pg.locator("#chat-stats").inner_text().lower()
    if os.environ.get("SCREENSHOT"):  # refreshes the README's picture: SCREENSHOT=ui/assets/screenshot.png
        pg.set_viewport_size({"width": 1280, "height": 900})
        pg.screenshot(path=os.environ["SCREENSHOT"], full_page=True)


def test_html_in_a_message_is_text(page):
    pg, _ = page
    evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>hello'
    send(pg, evil)
    pg.wait_for_function("document.querySelector('#chatbot')?.innerText?.includes('You said')")
    pg.wait_for_timeout(300)
    assert pg.evaluate("window.__pwned") is None
    assert pg.locator("#chatbot script").count() == 0


def test_upload_image_and_ask(page, tmp_path):
    pg, _ = page
    img = tmp_path / "photo.png"
    Image.new("RGBA", (320, 200), (0, 128, 255, 200)).save(img)
    pg.get_by_role("tab", name="Image chat").click()
    pg.locator("#image-input input[type=file]").set_input_files(str(img))
    pg.wait_for_selector("#image-chatbot img")
    pg.fill("#image-question textarea", "What is in this image?")
    pg.click("#image-ask")
    pg.wait_for_function("document.querySelector('#image-chatbot')?.innerText?.includes('I see an image of 320x200')")


def test_reload_keeps_the_conversation(page):
    pg, _ = page
    send(pg, "remember this line")
    pg.wait_for_function("document.querySelector('#chatbot')?.innerText?.includes('You said: remember this line')")
    pg.wait_for_timeout(500)  # the conversation is saved to the browser after the reply
    pg.reload()
    pg.wait_for_selector("#chatbot")
    pg.wait_for_function("document.querySelector('#chatbot')?.innerText?.includes('You said: remember this line')")


def test_chinese_browser_gets_chinese_labels(launched):
    from playwright.sync_api import sync_playwright

    url, _, _ = launched
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(locale="zh-CN")
        pg.goto(url)
        pg.wait_for_selector("#chat-send")
        pg.wait_for_function("document.querySelector('#chat-send')?.innerText?.includes('发送')")
        assert pg.get_by_role("tab", name="图片对话").count() == 1
        browser.close()
