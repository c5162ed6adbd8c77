"""The page in a real browser (Debian's chromium via Playwright), used as people use it: typing and pressing Enter,
pressing Stop mid-stream, uploading odd files, on a phone and a laptop, in English and Chinese."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from model_loader.engines.seam import Delta
from tests.browser import chromium, new_page, skip_without_chromium
from tests.conftest import TEST_LAUNCH, fake_startup
from tests.fakes import FakeEngine

pytestmark = skip_without_chromium
PHONE, LAPTOP = (390, 844), (1366, 768)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real page over fake engines, launched once for this module; (url, text engine, vision engine, startup)."""
    from ui.page import build_demo, launch_kwargs

    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    text, vision = FakeEngine("text"), FakeEngine("vision")
    st = fake_startup(text, vision, host="127.0.0.1", port=7860, max_image_pixels=60_000_000)
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    kw = launch_kwargs(st.cfg, i18n)
    kw.update(TEST_LAUNCH)
    _, url, _ = demo.launch(**kw)
    yield url, text, vision, st
    demo.close()
    if old is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def engines(app):
    """The fake engines, reset to quick echoing for each test."""
    _, text, vision, _ = app
    for e in (text, vision):
        e.queue.clear()
        e.delay_s = 0.01
        e.stopped.clear()
        e.__dict__.pop("reply_for", None)  # a test's own replies end with it
    return text, vision


@pytest.fixture
def page(app, browser, engines):
    with new_page(browser, app[0]) as pg:
        ready(pg)
        yield pg


def ready(pg) -> None:
    """Wait until the page has loaded and the engine state has reached the Send button."""
    pg.wait_for_selector("#chat-input textarea")
    pg.wait_for_selector("#chat-send:not([disabled])")


def bot_text(pg, chatbot="#chatbot") -> str:
    bots = pg.locator(f"{chatbot} .message-row.bot-row, {chatbot} [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def page_has(pg, text: str, where: str = "body") -> None:
    try:
        pg.wait_for_function("([w, t]) => document.querySelector(w)?.innerText?.includes(t)", arg=[where, text])
    except Exception:
        shot = f"/tmp/page_has-{abs(hash(text))}.png"
        pg.screenshot(path=shot, full_page=True)
        raise AssertionError(f"{text!r} never appeared in {where}: {pg.inner_text(where)[-300:]!r} (see {shot})") from None


def type_and_enter(pg, text: str, box: str = "#chat-input textarea") -> None:
    """Type like a person and press Enter."""
    pg.click(box)
    pg.keyboard.type(text)
    pg.keyboard.press("Enter")


def long_reply(engine: FakeEngine, words: int = 60, delay_s: float = 0.03) -> None:
    engine.delay_s = delay_s
    engine.enqueue(" ".join(f"word{i}" for i in range(words)))


def enabled(pg, selector: str) -> bool:
    return pg.evaluate("s => !document.querySelector(s).disabled", selector)


def wait_enabled(pg, selector: str, on: bool = True) -> None:
    pg.wait_for_function("([s, on]) => document.querySelector(s) && document.querySelector(s).disabled !== on",
                         arg=[selector, on])  # fmt: skip


def no_sideways_scroll(pg) -> None:
    assert pg.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page scrolls sideways"


def no_object_object(pg) -> None:
    assert "[object Object]" not in pg.evaluate("document.documentElement.outerHTML")


# ---- the matrix of issue 13: phone and laptop, English and Chinese ----

WORDS = {
    "en-US": {"send": "Send", "image_tab": "Image chat", "system_tab": "System", "examples": "Examples"},
    "zh-CN": {"send": "发送", "image_tab": "图片对话", "system_tab": "系统", "examples": "示例"},
}


@pytest.mark.parametrize("size", [PHONE, LAPTOP], ids=["phone", "laptop"])
@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
def test_type_enter_stream_and_controls(app, browser, engines, size, locale):
    text, _ = engines
    words = WORDS[locale]
    with new_page(browser, app[0], *size, locale=locale) as pg:
        ready(pg)
        page_has(pg, words["send"], "#chat-send")
        no_sideways_scroll(pg)
        lines = pg.evaluate(
            "(() => { const h = document.querySelector('#app-header h1');"
            " return h.getBoundingClientRect().height / parseFloat(getComputedStyle(h).lineHeight); })()"
        )
        assert lines < 2.5, f"the heading takes {lines:.1f} lines"
        if size == PHONE:
            box = pg.locator("#chat-input textarea").bounding_box()
            assert box["width"] > 0.9 * (size[0] - 16), "the message box does not take the phone's width"
        in_view_as_it_opens(pg, size[1])
        assert not enabled(pg, "#chat-stop"), "Stop is live with nothing running"

        long_reply(text, words=80, delay_s=0.04)
        type_and_enter(pg, "tell me a story")
        page_has(pg, "word3", "#chatbot")
        first = bot_text(pg)
        assert not enabled(pg, "#chat-send") and not enabled(pg, "#chat-regenerate") and enabled(pg, "#chat-stop")
        assert "word79" not in first, "the reply did not stream: it came in one piece"
        page_has(pg, "word79", "#chatbot")
        page_has(pg, "tokens/s", "#chat-stats")
        wait_enabled(pg, "#chat-send")
        wait_enabled(pg, "#chat-stop", on=False)
        assert enabled(pg, "#chat-regenerate") and "word79" in bot_text(pg)
        assert pg.input_value("#chat-input textarea") == ""
        no_sideways_scroll(pg)
        no_object_object(pg)

        pg.get_by_role("tab", name=words["image_tab"]).click()
        examples = pg.locator("#image-examples img")
        examples.first.wait_for()
        assert examples.count() == 3 and all(examples.nth(i).is_visible() for i in range(3))
        page_has(pg, words["examples"], "#image-examples")
        no_sideways_scroll(pg)
        no_object_object(pg)
        pg.get_by_role("tab", name=words["system_tab"]).click()
        page_has(pg, "No NVIDIA GPU", "#system-memory")
        no_sideways_scroll(pg)
        no_object_object(pg)
        assert not pg.errors, pg.errors


def in_view_as_it_opens(pg, height: int) -> None:
    """The message box (with its hint whole) and Send are in view as the page opens, not below the fold."""
    for where in ("#chat-input textarea", "#chat-send"):
        box = pg.locator(where).bounding_box()
        assert box["y"] + box["height"] <= height, f"{where} ends at {box['y'] + box['height']:.0f} px of {height}"
    clipped = pg.evaluate(
        "(() => { const t = document.querySelector('#chat-input textarea'); return t.scrollHeight > t.clientHeight + 1; })()"
    )
    assert not clipped, "the message box's hint is cut"


def test_a_small_phone_opens_with_the_message_box_and_send_in_view(app, browser):
    """New-user trial, 375 x 667: the empty chat took the screen and Send started at the bottom edge."""
    with new_page(browser, app[0], 375, 667) as pg:
        ready(pg)
        in_view_as_it_opens(pg, 667)
        no_sideways_scroll(pg)


# ---- controls follow the reply (issues 12 item 2, 13) ----


def test_shift_enter_adds_a_line_and_enter_waits_while_a_reply_streams(page, engines):
    pg, (text, _) = page, engines
    pg.click("#chat-input textarea")
    pg.keyboard.type("first line")
    pg.keyboard.press("Shift+Enter")
    pg.keyboard.type("second line")
    assert pg.input_value("#chat-input textarea") == "first line\nsecond line"
    assert not text.calls or text.calls[-1][1][-1]["content"] != "first line"
    long_reply(text, words=80)
    pg.keyboard.press("Enter")
    page_has(pg, "word2", "#chatbot")
    calls = len(text.calls)
    type_and_enter(pg, "impatient")
    pg.keyboard.press("Enter")
    pg.click("#chat-send", force=True)  # a disabled button: nothing happens
    wait_enabled(pg, "#chat-send")
    assert len(text.calls) == calls, "a second reply started while one was streaming"
    assert pg.input_value("#chat-input textarea") == "impatient", "the typed message was lost"
    assert "first line\nsecond line" in text.calls[-1][1][-1]["content"]
    type_and_enter(pg, "")
    page_has(pg, "You said: impatient", "#chatbot")


def test_enter_while_a_reply_streams_keeps_the_message_and_says_why(app, browser, engines):
    """Enter while a reply streams sends nothing; the message stays in the box and a note under it says why and
    what to do, in the browser's language (new-user trial: nothing happened and nothing said why). The note goes
    once the reply has ended."""
    text, _ = engines
    for locale, words in (("en-US", "Wait for the reply to finish, or press Stop"), ("zh-CN", "请等待回答完成")):
        with new_page(browser, app[0], locale=locale) as pg:
            ready(pg)
            note = pg.locator("#chat-busy-note")
            assert not note.is_visible()
            long_reply(text, words=80)
            type_and_enter(pg, "first")
            page_has(pg, "word2", "#chatbot")
            type_and_enter(pg, "impatient")
            note.wait_for(state="visible")
            assert words in note.inner_text()
            assert pg.input_value("#chat-input textarea") == "impatient"
            box, shown = pg.locator("#chat-input textarea").bounding_box(), note.bounding_box()
            assert abs(shown["y"] - (box["y"] + box["height"])) < 80, "the note is not by the message box"
            wait_enabled(pg, "#chat-send")
            note.wait_for(state="hidden")
            assert pg.input_value("#chat-input textarea") == "impatient"


def test_after_sending_the_box_has_the_focus_and_a_refused_blank_message_is_cleared(page, engines):
    """The next message can be typed at once after Send or Enter (new-user trial: a click on Send left the focus on
    the button); a message of spaces alone is refused and leaves the box empty, not full of spaces."""
    pg = page
    box = "#chat-input textarea"
    focused = "() => document.activeElement === document.querySelector('#chat-input textarea')"
    pg.fill(box, "sent with the button")
    pg.click("#chat-send")
    page_has(pg, "You said: sent with the button", "#chatbot")
    wait_enabled(pg, "#chat-send")
    assert pg.evaluate(focused), "Send kept the focus"
    pg.keyboard.type("typed at once")
    assert pg.input_value(box) == "typed at once"
    pg.keyboard.press("Enter")
    page_has(pg, "You said: typed at once", "#chatbot")
    wait_enabled(pg, "#chat-send")
    assert pg.evaluate(focused), "Enter lost the focus"
    pg.fill(box, "    ")
    pg.click("#chat-send")
    page_has(pg, "Please type a message first")
    wait_enabled(pg, "#chat-send")
    assert pg.input_value(box) == "" and pg.evaluate(focused)
    pg.keyboard.type("   ")
    pg.keyboard.press("Enter")
    pg.wait_for_function("() => document.querySelector('#chat-input textarea').value === ''")
    assert pg.locator("#chatbot .user-row").count() == 2


def test_what_is_typed_right_after_enter_is_kept(page, engines):
    """The box lets go of a sent message when the server takes it, a moment after Enter; whatever was typed in that
    moment is the next message and stays (new-user trial: "first", Enter, then "second" at once left "econd")."""
    pg = page
    text, _ = engines
    text.delay_s = 0.3  # the reply's first word comes late: the box is emptied before it, with the question shown
    type_and_enter(pg, "first")
    pg.keyboard.type("second", delay=40)
    page_has(pg, "You said: first", "#chatbot")
    wait_enabled(pg, "#chat-send")
    assert pg.input_value("#chat-input textarea") == "second"


OVERLAPS = """() => {
  const bar = document.querySelector('#chatbot .top-panel'), area = document.querySelector('#chatbot .bubble-wrap');
  const t = bar.getBoundingClientRect(), a = area.getBoundingClientRect();
  const hits = [];
  for (const el of document.querySelectorAll('#chatbot .message, #chatbot button, #chatbot textarea')) {
    if (bar.contains(el)) continue;
    const r = el.getBoundingClientRect(), top = Math.max(r.top, a.top), bottom = Math.min(r.bottom, a.bottom);
    if (r.width && top < t.bottom && bottom > t.top && r.left < t.right && r.right > t.left)
      hits.push(el.getAttribute('aria-label') || el.className);
  }
  return hits;
}"""


def test_the_chats_toolbar_covers_no_message_or_its_buttons(app, browser, engines):
    """Gradio's Clear and Copy-conversation icons float over the top right of the chat, and messages scrolled up
    (the chat follows the newest) passed under them, the first message's own icons too (new-user trial). The icons
    now sit above the scrolled area, at a laptop's size and a phone's."""
    text = engines[0]
    for size in (LAPTOP, PHONE):
        with new_page(browser, app[0], *size) as pg:
            ready(pg)
            for i in range(3):
                text.enqueue(f"reply {i} " + "words " * 60)  # long replies to short questions: typing is slow
                type_and_enter(pg, f"message {i}")
                page_has(pg, f"reply {i} words", "#chatbot")
                wait_enabled(pg, "#chat-send")
            for where, y in (("bottom", 10**6), ("top", 0)):
                pg.evaluate("y => document.querySelector('#chatbot .bubble-wrap').scrollTo(0, y)", y)
                pg.locator("#chatbot .message").first.hover()
                assert pg.evaluate(OVERLAPS) == [], f"{size}, scrolled to the {where}"
            chat, area = pg.locator("#chatbot").bounding_box(), pg.locator("#chatbot .bubble-wrap").bounding_box()
            assert area["y"] + area["height"] <= chat["y"] + chat["height"] + 1, "the messages run out of the chat"


def test_one_press_of_enter_is_one_server_event(page):
    """A turn costs the server one queued event (join + its stream), not a chain of checks, saves and unlocks:
    at 32 users each extra request sat in the burst at every turn's start (issue 14)."""
    pg = page
    type_and_enter(pg, "warm up")
    page_has(pg, "You said: warm up", "#chatbot")
    wait_enabled(pg, "#chat-send")
    sent: list[str] = []
    pg.on("request", lambda r: sent.append(r.url) if "/gradio_api/" in r.url and "heartbeat" not in r.url else None)
    type_and_enter(pg, "count my requests")
    page_has(pg, "You said: count my requests", "#chatbot")
    wait_enabled(pg, "#chat-send")
    pg.wait_for_timeout(300)  # anything chained after the reply would be sent by now
    joins = [u for u in sent if "/queue/join" in u]
    posts = [u for u in sent if "/run/predict" in u]
    assert len(joins) == 1 and not posts, sent


def test_a_long_reply_after_a_few_turns_streams_smoothly_and_stops_at_once(page, engines):
    """New-user trial: after three turns a 400-word reply drew about 8 frames a second and Stop took effect 11.6 s
    after the click. Gradio's chat normalised its whole value hundreds of times per update, because the page had
    put the kept settings into components its closed Settings panel had not loaded (ui/page.py)."""
    pg, (text, _) = page, engines
    for i in range(4):
        type_and_enter(pg, f"turn {i}")
        page_has(pg, f"You said: turn {i}", "#chatbot")
        wait_enabled(pg, "#chat-send")
    long_reply(text, words=600, delay_s=0.02)
    type_and_enter(pg, "Tell me a long story")
    page_has(pg, "word20", "#chatbot")
    frames = pg.evaluate("""() => new Promise(done => { let n = 0; const t0 = performance.now();
        const f = (t) => { n++; if (t - t0 < 2000) requestAnimationFrame(f); else done(n / ((t - t0) / 1000)); };
        requestAnimationFrame(f); })""")
    assert frames >= 15, f"the page drew {frames:.0f} frames a second while the reply streamed"
    clicked = time.monotonic()
    pg.click("#chat-stop")
    pg.wait_for_function("document.querySelector('#chat-stats').innerText.toLowerCase().includes('stopped')")
    took = time.monotonic() - clicked
    assert took < 2, f"Stop took effect {took:.1f} s after the click"
    stopped_at = bot_text(pg)
    pg.wait_for_timeout(500)
    assert bot_text(pg) == stopped_at and "word599" not in stopped_at


def test_stop_ends_the_reply_and_gives_the_controls_back(page, engines):
    pg, (text, _) = page, engines
    long_reply(text, words=400, delay_s=0.05)
    type_and_enter(pg, "Tell me a long story")
    page_has(pg, "word5", "#chatbot")
    for action in ("Retry", "Edit", "Undo"):  # the chatbot's own buttons are off while it streams
        assert pg.locator(f"#chatbot button[aria-label='{action}']").last.is_disabled()
    pg.click("#chat-stop")
    pg.wait_for_function("document.querySelector('#chat-stats').innerText.toLowerCase().includes('stopped')")
    wait_enabled(pg, "#chat-send")
    wait_enabled(pg, "#chat-stop", on=False)
    stopped_at = bot_text(pg)
    pg.wait_for_timeout(500)
    assert bot_text(pg) == stopped_at and "word399" not in stopped_at
    assert text.stopped and text.active_sessions() == 0


def test_clear_cancels_the_running_reply_first(page, engines):
    pg, (text, _) = page, engines
    long_reply(text, words=400, delay_s=0.03)
    type_and_enter(pg, "a long one")
    page_has(pg, "word5", "#chatbot")
    pg.click("#chat-clear")
    pg.wait_for_function("!document.querySelector('#chatbot').innerText.includes('word')")
    wait_enabled(pg, "#chat-send")
    pg.wait_for_timeout(600)  # long enough for a reply that was not stopped to repaint the chat
    assert "word" not in pg.inner_text("#chatbot") and text.active_sessions() == 0


def test_a_failed_reply_gives_the_controls_back(page, engines, monkeypatch):
    pg, (text, _) = page, engines

    async def broken(session_id, messages, settings):
        yield Delta("half an ans")
        raise RuntimeError("the engine fell over")

    monkeypatch.setattr(text, "stream", broken)
    type_and_enter(pg, "hello")
    page_has(pg, "half an ans", "#chatbot")
    page_has(pg, "Error")
    wait_enabled(pg, "#chat-send")
    wait_enabled(pg, "#chat-stop", on=False)
    assert enabled(pg, "#chat-regenerate")


def test_a_failed_engine_keeps_send_off_after_a_refused_enter(app, browser, engines):
    """Enter with a failed engine changes nothing: Send stays off and the message stays in the box (the page gives
    the controls back by itself when a turn ends, and must not turn Send on for an engine that cannot answer). In
    this page Enter sends nothing once Send is off, so this guards the outcome; it passed before the fix too."""
    st = app[3]
    slot = st.slots["text"]
    engine = slot.engine
    slot.fail("The text engine failed to start: out of memory")
    try:
        with new_page(browser, app[0]) as pg:
            pg.wait_for_selector("#chat-status:has-text('out of memory')")
            wait_enabled(pg, "#chat-send", on=False)
            type_and_enter(pg, "hello?")
            page_has(pg, "out of memory")  # the refusal's toast
            pg.wait_for_timeout(500)  # the page's own unlock has run by now
            assert not enabled(pg, "#chat-send")
            assert pg.input_value("#chat-input textarea") == "hello?"
    finally:
        slot.engine, slot.state, slot.message = engine, "ready", "Ready"


def test_closing_the_tab_removes_its_files(app, browser, engines, tmp_path):
    root = Path(os.environ["GRADIO_TEMP_DIR"])
    with new_page(browser, app[0]) as pg:
        ready(pg)
        type_and_enter(pg, "keep me")
        page_has(pg, "You said: keep me", "#chatbot")
        pg.get_by_text("Download conversation").click()
        pg.get_by_role("button", name="Markdown", exact=True).click()
        pg.wait_for_selector("#component-0, a[download]", state="attached")
        pg.wait_for_function("document.body.innerText.includes('.md')")
        session_dirs = {p.parent.parent for p in root.glob("internlm-chat-*/s-*/*/*.md")}
        assert session_dirs
    deadline = time.time() + 15
    while any(d.exists() for d in session_dirs) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(d.exists() for d in session_dirs), "the closed tab's files are still there"


def test_one_click_downloads_the_chat_and_an_empty_chat_offers_none(page):
    """The export took two clicks (write the file, then its link) and an empty chat gave a 15-byte file (new-user
    trial)."""
    pg = page
    pg.get_by_text("Download conversation").click()
    md = pg.get_by_role("button", name="Markdown", exact=True)
    js = pg.get_by_role("button", name="JSON", exact=True)
    assert md.is_disabled() and js.is_disabled()
    type_and_enter(pg, "keep me too")
    page_has(pg, "You said: keep me too", "#chatbot")
    wait_enabled(pg, "#chat-send")
    with pg.expect_download() as got:
        md.click()
    body = Path(got.value.path()).read_text(encoding="utf-8")
    assert "keep me too" in body and "You said: keep me too" in body
    with pg.expect_download() as got:
        js.click()
    assert '"content": "keep me too"' in Path(got.value.path()).read_text(encoding="utf-8")
    pg.reload()  # the chat kept in the browser comes back, and can be downloaded
    ready(pg)
    pg.get_by_text("Download conversation").click()
    page_has(pg, "You said: keep me too", "#chatbot")
    pg.wait_for_function(
        "[...document.querySelectorAll('button')].filter(b => b.innerText.trim() === 'Markdown')[0]?.disabled === false"
    )
    pg.click("#chat-clear")
    pg.wait_for_function("document.querySelectorAll('#chatbot .user-row').length === 0")
    pg.wait_for_function("[...document.querySelectorAll('button')].filter(b => b.innerText.trim() === 'Markdown')[0].disabled")


# ---- what the user sees of text and errors (issue 12 items 5 and 7) ----


def test_refusals_are_readable_on_the_page(page, tmp_path):
    pg = page
    pg.click("#chat-input textarea")
    pg.keyboard.press("Enter")
    page_has(pg, "Please type a message first")
    pg.get_by_role("tab", name="Image chat").click()
    type_and_enter(pg, "what is this?", "#image-question textarea")
    page_has(pg, "Upload an image first")
    fake = tmp_path / "notes.png"
    fake.write_text("just some text, not a picture")
    pg.locator("#image-input input[type=file]").set_input_files(str(fake))
    page_has(pg, "not an image we can read")
    pg.wait_for_timeout(300)  # the refused upload's status would land now
    assert pg.locator("#image-input .error, #image-chatbot .error").count() == 0, "an Error pill covers the image"
    assert pg.locator("#image-input img").count() == 0, "the refused file still sits in the image box"
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(20 * 2**20 + 1))  # over the 20 MB upload limit
    pg.locator("#image-input input[type=file]").set_input_files(str(big))
    page_has(pg, "exceed the maximum allowed size")


def test_a_refusal_leaves_the_conversation_in_view(page):
    """The toast explains; the chat and the box stay as they were, without Gradio's red "Error" pill over them."""
    pg = page
    type_and_enter(pg, "first question")
    pg.wait_for_function("document.querySelectorAll('#chatbot .bot-row').length === 1")
    wait_enabled(pg, "#chat-send")
    pg.click("#chat-input textarea")
    pg.keyboard.press("Enter")  # nothing typed
    page_has(pg, "Please type a message first")
    pg.wait_for_timeout(300)  # the failed event's status would land now
    assert pg.locator("#chatbot .error, #chat-input .error").count() == 0, "an Error pill covers the chat"
    assert "first question" in pg.locator("#chatbot").inner_text()
    wait_enabled(pg, "#chat-send")
    pg.get_by_role("tab", name="Image chat").click()
    type_and_enter(pg, "what is this?", "#image-question textarea")
    page_has(pg, "Upload an image first")
    pg.wait_for_timeout(300)
    assert pg.locator("#image-chatbot .error, #image-question .error").count() == 0
    # a refusal is a warning in both tabs (new-user trial: the Image tab's was Gradio's red "Error" toast)
    assert pg.locator(".toast-body.warning", has_text="Upload an image first").count() == 1
    assert pg.locator(".toast-body.error").count() == 0
    assert pg.input_value("#image-question textarea") == "what is this?"  # kept, to ask once the image is there


def edit_first_message(pg, text: str) -> None:
    pg.locator("#chatbot .message-row").nth(0).hover()
    pg.locator("#chatbot button[aria-label='Edit']").first.click()
    pg.locator("#chatbot textarea").first.fill(text)
    pg.locator("#chatbot button[aria-label='Submit']").click()


def test_the_chat_settings_are_kept_across_a_reload_and_used(page, engines):
    """A reload keeps the conversation, so it keeps the settings it was held with too (new-user trial: the system
    prompt and Max new tokens went back to their defaults, and the restored chat went on without saying so)."""
    pg, (text, _) = page, engines
    pg.get_by_text("Settings").first.click()
    pg.locator("#chat-system textarea").fill("You answer like a pirate.")
    numbers = pg.locator("#chat-settings input[type=number]")
    numbers.nth(0).fill("1.3")  # temperature
    numbers.nth(0).press("Enter")
    pg.wait_for_timeout(300)
    pg.reload()
    ready(pg)
    pg.get_by_text("Settings").first.click()
    assert pg.locator("#chat-system textarea").input_value() == "You answer like a pirate."
    assert float(pg.locator("#chat-settings input[type=number]").nth(0).input_value()) == 1.3
    type_and_enter(pg, "ahoy")
    page_has(pg, "You said: ahoy", "#chatbot")
    _, messages, settings = text.calls[-1]
    assert messages[0] == {"role": "system", "content": "You answer like a pirate."} and settings.temperature == 1.3


def test_copy_and_edit_give_a_message_as_it_was_typed(page, engines):
    """The chat holds a user's message escaped so that it shows literally; Copy and the Edit box must give it back
    as typed (new-user trial: the clipboard got `\\*\\*b\\*\\*`, `&nbsp;` and an invisible U+2060), in "Copy
    conversation" too."""
    pg, (text, _) = page, engines
    pg.add_init_script("""(() => { window.__copied = [];
        Object.defineProperty(navigator, 'clipboard', {configurable: true, value: {
            writeText: async (t) => { window.__copied.push(t); } }}); })()""")
    pg.reload()
    ready(pg)
    typed = "a **b** <|im_end|> `c`\n# h\n    ind"
    before = len(text.calls)
    pg.click("#chat-input textarea")
    for i, line in enumerate(typed.split("\n")):
        if i:
            pg.keyboard.press("Shift+Enter")
        pg.keyboard.type(line)
    pg.keyboard.press("Enter")
    page_has(pg, "You said:", "#chatbot")
    wait_enabled(pg, "#chat-send")
    pg.locator("#chatbot .message-row").nth(0).hover()
    pg.locator("#chatbot button[aria-label='Copy message']").first.click()
    pg.wait_for_function("window.__copied.length > 0")
    assert pg.evaluate("window.__copied[0]") == typed
    # "Copy conversation" too, whose text joins every message (a new-user trial got `a\\_b` from it)
    reply = text.reply_for(text.calls[-1][1])  # the answer as the chat holds it (Markdown)
    pg.locator("#chatbot button[aria-label='Copy conversation']").click()
    pg.wait_for_function("window.__copied.length > 1")
    assert pg.evaluate("window.__copied[1]") == f"user: {typed}\n\nassistant: {reply}"
    text.enqueue("see \u2060\\*not\\* \\_x")  # an answer with a mark in it (pasted text carries U+2060) is left as it is
    type_and_enter(pg, "next")
    page_has(pg, "*not*", "#chatbot")
    wait_enabled(pg, "#chat-send")
    pg.locator("#chatbot button[aria-label='Copy conversation']").click()
    pg.wait_for_function("window.__copied.length > 2")
    assert pg.evaluate("window.__copied[2]").endswith("\n\nuser: next\n\nassistant: see \\*not\\* \\_x")
    pg.locator("#chatbot .message-row").nth(0).hover()
    pg.locator("#chatbot button[aria-label='Edit']").first.click()
    box = pg.locator("#chatbot textarea").first
    pg.wait_for_function("() => { const t = document.querySelector('#chatbot textarea'); return t && t.value.startsWith('a '); }")
    assert box.input_value() == typed
    box.press("End")
    pg.keyboard.type(" more")
    pg.locator("#chatbot button[aria-label='Submit']").click()
    page_has(pg, "ind more", "#chatbot")
    wait_enabled(pg, "#chat-send")
    first, edited = text.calls[before][1][-1]["content"], text.calls[-1][1][-1]["content"]
    assert edited == first + " more"  # the model got the edit as typed (special tokens neutralised, as in any turn)


def test_an_edit_answers_again_and_a_refused_edit_puts_the_message_back(page, engines):
    """An edited question is answered again from there; an edit to nothing is refused, and the page, which shows
    the edit already, gets the question back (the new-user trial lost the turn: a blank bubble stayed, was saved,
    and was sent with the next message)."""
    pg, (text, _) = page, engines
    type_and_enter(pg, "abc")
    page_has(pg, "You said: abc", "#chatbot")
    wait_enabled(pg, "#chat-send")
    edit_first_message(pg, "   ")
    page_has(pg, "Please type a message first")
    pg.wait_for_function("document.querySelector('#chatbot .user-row')?.innerText.replace(/\\u2060/g, '').trim() === 'abc'")
    wait_enabled(pg, "#chat-send")
    calls = len(text.calls)
    type_and_enter(pg, "next")
    page_has(pg, "You said: next", "#chatbot")
    assert [m["content"] for m in text.calls[calls][1] if m["role"] == "user"] == ["abc", "next"]
    wait_enabled(pg, "#chat-send")
    edit_first_message(pg, "xyz")
    page_has(pg, "You said: xyz", "#chatbot")
    assert "next" not in pg.locator("#chatbot").inner_text()


def test_enter_in_the_edit_box_saves_the_edit_and_shift_enter_adds_a_line(page, engines):
    """The message box sends on Enter; the Edit box of a message added a line, and saving took its small ✓ (new-user
    trials, twice)."""
    pg = page
    type_and_enter(pg, "abc")
    page_has(pg, "You said: abc", "#chatbot")
    wait_enabled(pg, "#chat-send")
    pg.locator("#chatbot .message-row").nth(0).hover()
    pg.locator("#chatbot button[aria-label='Edit']").first.click()
    box = pg.locator("#chatbot textarea").first
    box.fill("xyz")
    box.press("Shift+Enter")
    pg.keyboard.type("second line")
    box.press("Enter")
    page_has(pg, "You said: xyz", "#chatbot")
    assert engines[0].calls[-1][1][-1]["content"] == "xyz\nsecond line"


def test_an_edit_too_long_for_the_window_is_refused_and_put_back(page):
    """The page shows an edit at once; one refused as too long gets the question and its answer back, rather than
    the long edit over the old answer (review: the first update of a turn now comes after the window check)."""
    pg = page
    type_and_enter(pg, "abc")
    page_has(pg, "You said: abc", "#chatbot")
    wait_enabled(pg, "#chat-send")
    edit_first_message(pg, "x " * 20_000)
    page_has(pg, "too long for the model")
    pg.wait_for_function("document.querySelector('#chatbot .user-row')?.innerText.replace(/\\u2060/g, '').trim() === 'abc'")
    assert "You said: abc" in pg.locator("#chatbot").inner_text()


def test_a_message_too_long_stays_in_the_box_to_shorten(page):
    pg = page
    long = "x " * 20_000
    pg.fill("#chat-input textarea", long)
    pg.click("#chat-input textarea")
    pg.keyboard.press("Enter")
    page_has(pg, "too long for the model")
    wait_enabled(pg, "#chat-send")
    assert pg.input_value("#chat-input textarea").strip() == long.strip()  # still there, to shorten
    assert pg.locator("#chatbot .message-row.user-row").count() == 0  # and not left unanswered in the chat


def test_user_text_shows_literally_and_never_runs(page):
    pg = page
    evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    for i, text in enumerate(("</s>", "<s>x</s> **not bold** `x` # no heading", evil)):
        type_and_enter(pg, text)
        pg.wait_for_function(f"document.querySelectorAll('#chatbot .bot-row').length === {i + 1}")
        wait_enabled(pg, "#chat-send")
        user = pg.locator("#chatbot .message-row.user-row").last
        assert user.inner_text().replace("\u2060", "").strip() == text  # an invisible mark says "escaped"
        assert user.locator("s, strong, code, h1, img, script").count() == 0
    assert pg.evaluate("window.__pwned") is None


def test_the_page_still_shows_user_text_literally_where_api_clients_get_it_as_typed(page, tmp_path):
    """Undo and the image chat's steps are API endpoints too, which give API clients user text as typed; the page
    itself still gets it held to show literally."""
    from PIL import Image

    pg = page
    text = "<s>x</s> **not bold** `x`"
    for i, message in enumerate((text, "second")):
        type_and_enter(pg, message)
        pg.wait_for_function(f"document.querySelectorAll('#chatbot .bot-row').length === {i + 1}")  # Send is off first
        wait_enabled(pg, "#chat-send")
    pg.click("#chat-undo")
    pg.wait_for_function("document.querySelectorAll('#chatbot .user-row').length === 1")
    user = pg.locator("#chatbot .message-row.user-row").last
    assert user.inner_text().replace("\u2060", "").strip() == text
    assert user.locator("s, strong, code").count() == 0
    img = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "red").save(img)
    pg.get_by_role("tab", name="Image chat").click()
    pg.locator("#image-input input[type=file]").set_input_files(str(img))
    pg.wait_for_selector("#image-chatbot img")
    type_and_enter(pg, text, "#image-question textarea")
    page_has(pg, "I see an image of 64x48", "#image-chatbot")
    user = pg.locator("#image-chatbot .message-row.user-row").last
    assert user.inner_text().replace("\u2060", "").strip() == text
    assert user.locator("s, strong, code").count() == 0


# ---- images (issue 12 item 6, issue 13) ----


def test_upload_ask_with_enter_and_use_an_example(page, engines, tmp_path):
    from PIL import Image

    pg = page
    img = tmp_path / "photo.png"
    Image.new("RGBA", (320, 200), (0, 128, 255, 0)).save(img)
    pg.get_by_role("tab", name="Image chat").click()
    pg.locator("#image-input input[type=file]").set_input_files(str(img))
    pg.wait_for_selector("#image-chatbot img")
    type_and_enter(pg, "What is in this image?", "#image-question textarea")
    page_has(pg, "I see an image of 320x200", "#image-chatbot")
    wait_enabled(pg, "#image-ask")
    pg.locator("#image-chatbot .message-row").first.hover()
    assert pg.locator("#image-chatbot button[aria-label='Share']:visible").count() == 0  # "Must be on Spaces to share"
    pg.locator("#image-examples img").nth(1).click()
    pg.wait_for_function("document.querySelector('#image-question textarea').value.includes('visitors')")
    type_and_enter(pg, "", "#image-question textarea")
    page_has(pg, "I see an image of 640x480 and you asked: Which month", "#image-chatbot")


# ---- saved conversations (issue 13) ----


def test_reload_keeps_the_newest_turns_when_storage_is_short(page, engines, monkeypatch):
    import ui.chat_tab

    pg = page
    type_and_enter(pg, "remember this line")
    page_has(pg, "You said: remember this line", "#chatbot")
    wait_enabled(pg, "#chat-send")
    pg.reload()
    ready(pg)
    page_has(pg, "You said: remember this line", "#chatbot")
    monkeypatch.setattr(ui.chat_tab, "SAVE_BUDGET_BYTES", 1500)
    for i in range(4):
        type_and_enter(pg, f"turn {i} " + "x" * 300)
        page_has(pg, f"You said: turn {i}", "#chatbot")
        wait_enabled(pg, "#chat-send")
    page_has(pg, "too long to keep whole", "#chat-stats")
    pg.wait_for_timeout(300)
    pg.reload()
    ready(pg)
    page_has(pg, "You said: turn 3", "#chatbot")
    assert "remember this line" not in pg.inner_text("#chatbot")


def test_a_turn_saves_the_chat_as_it_starts_and_ends_and_a_reload_mid_reply_keeps_the_question(page, engines):
    """The browser encrypts and writes the saved conversation whenever its value changes: a turn that sent it back
    with every streamed update rewrote the whole conversation ~25 times a turn (review). It is written as the turn
    starts and as it ends: a reload while a reply streams keeps the question (new-user trial: it was lost), to be
    answered again, and not the partial answer."""
    pg, (text, _) = page, engines
    pg.evaluate(
        """() => { window.__writes = 0; const real = Storage.prototype.setItem;
        Storage.prototype.setItem = function (k, v) {
            if (k === 'internlm2-chat-history') window.__writes += 1; return real.call(this, k, v); }; }"""
    )
    type_and_enter(pg, "first question")
    page_has(pg, "You said: first question", "#chatbot")
    wait_enabled(pg, "#chat-send")
    long_reply(text, words=100, delay_s=0.01)
    type_and_enter(pg, "second question")
    page_has(pg, "word99", "#chatbot")
    wait_enabled(pg, "#chat-send")
    pg.wait_for_timeout(300)
    # per turn: as it starts, as it ends, and once more as Gradio's completion message repeats the last value
    assert pg.evaluate("window.__writes") <= 6, f"{pg.evaluate('window.__writes')} writes for two turns"
    text.delay_s = 0.02
    text.enqueue(" ".join(f"part{i}" for i in range(400)))
    type_and_enter(pg, "third question")
    page_has(pg, "part5", "#chatbot")
    pg.reload()
    ready(pg)
    page_has(pg, "third question", "#chatbot")
    assert "word99" in pg.inner_text("#chatbot") and "part5" not in pg.inner_text("#chatbot")
    page_has(pg, "Regenerate", "#chat-stats")  # the unanswered question says why and what to do (new-user trial)
    text.reply_for = lambda messages: "answered again"
    pg.locator("#chat-regenerate").click()
    page_has(pg, "answered again", "#chatbot")


def test_the_save_budget_fits_the_browsers_storage(page):
    from ui.chat_tab import SAVE_BUDGET_BYTES

    # Gradio stores the conversation encrypted and base64-encoded: 4/3 of its JSON, plus padding
    chars = SAVE_BUDGET_BYTES * 4 // 3 + 4096
    assert pg_store(page, chars) == "ok"
    assert pg_store(page, 6_000_000) != "ok", "the double is kinder than the browser: no quota at all"


def pg_store(pg, chars: int) -> str:
    return pg.evaluate(
        "n => { try { localStorage.setItem('__probe', 'a'.repeat(n)); localStorage.removeItem('__probe'); return 'ok'; }"
        " catch (e) { return e.name; } }",
        chars,
    )


# ---- System tab for visitors (issue 13) ----


def test_system_tab_without_a_gpu_says_so_and_hides_the_configuration(page):
    pg = page
    pg.get_by_role("tab", name="System").click()
    page_has(pg, "No NVIDIA GPU is visible", "#system-memory")
    page_has(pg, "ready", "#system-engines")
    assert not pg.locator("#system-chart").is_visible()
    assert not pg.locator("#system-config").is_visible()
    assert "cache_dir" not in pg.inner_text("body")
    no_object_object(pg)


# ---- README screenshots from the test double: SCREENSHOTS=ui/assets pytest tests/test_browser.py -k screenshots ----


@pytest.mark.skipif(not os.environ.get("SCREENSHOTS"), reason="set SCREENSHOTS=ui/assets to refresh the README's pictures")
def test_screenshots(app, browser, engines, tmp_path):
    text, vision = engines
    out = os.environ["SCREENSHOTS"]
    with new_page(browser, app[0], 1280, 860) as pg:
        ready(pg)
        text.enqueue(
            "Shanghai is China's largest city and its financial centre, on the Yangtze delta.\n\n"
            "- **The Bund**: a riverside walk of 1920s banks facing Pudong's towers.\n"
            "- **Yu Garden**: a Ming-dynasty garden in the old town.\n"
            "- **Food**: try *xiaolongbao*, soup dumplings, at any corner shop."
        )
        type_and_enter(pg, "What should I see in Shanghai in one day?")
        page_has(pg, "soup dumplings", "#chatbot")
        wait_enabled(pg, "#chat-send")
        pg.mouse.click(5, 5)  # no focus ring on the box
        pg.wait_for_timeout(600)  # button transitions
        pg.screenshot(path=f"{out}/chat.png")
        pg.set_viewport_size({"width": 1280, "height": 1000})
        pg.get_by_role("tab", name="Image chat").click()
        vision.enqueue("A bar chart of visitors per month: April has the most, 260 visitors, then May with 210.")
        pg.locator("#image-examples img").nth(1).click()
        pg.wait_for_function("document.querySelector('#image-question textarea').value.includes('visitors')")
        type_and_enter(pg, "", "#image-question textarea")
        page_has(pg, "April has the most", "#image-chatbot")
        wait_enabled(pg, "#image-ask")
        pg.evaluate("window.scrollTo(0, 0)")
        pg.mouse.click(5, 5)
        pg.wait_for_timeout(600)
        pg.screenshot(path=f"{out}/image.png")


def test_two_tabs_keep_their_own_chats_across_reloads(page, engines):
    """Two tabs of one browser saved their chats under one key: reloading one showed the other's chat, and its own
    was gone (new-user trial). Each tab now comes back to its own chat; a new tab opens the latest one."""
    first = page
    type_and_enter(first, "question from tab A")
    page_has(first, "You said: question from tab A", "#chatbot")
    wait_enabled(first, "#chat-send")
    second = first.context.new_page()
    second.goto(first.url)
    ready(second)
    page_has(second, "question from tab A", "#chatbot")  # a new tab opens the latest chat
    second.locator("#chat-clear").click()
    type_and_enter(second, "question from tab B")
    page_has(second, "You said: question from tab B", "#chatbot")
    wait_enabled(second, "#chat-send")
    first.reload()
    ready(first)
    page_has(first, "question from tab A", "#chatbot")
    assert "tab B" not in first.inner_text("#chatbot")
    second.reload()
    ready(second)
    page_has(second, "question from tab B", "#chatbot")
    assert "tab A" not in second.inner_text("#chatbot")


def test_an_open_page_sees_the_engines_restart_with_the_engine_process(browser, engines, tmp_path, monkeypatch):
    """With --engine-process a ready engine can go back to loading (its process died and is being started again):
    a page opened before must keep watching and say so (review: its timer stopped once the engines had settled)."""
    from ui import page as page_module
    from ui.page import build_demo, launch_kwargs

    monkeypatch.setattr(page_module, "SETTLED_TICK_S", 1.0)
    text, vision = engines
    st = fake_startup(text, vision, host="127.0.0.1", engine_process=True)
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    _, url, _ = demo.launch(**{**launch_kwargs(st.cfg, i18n), "server_port": None, "prevent_thread_lock": True, "quiet": True})
    try:
        with new_page(browser, url) as pg:
            ready(pg)
            pg.wait_for_timeout(1500)  # settled: the page's own watching slows down
            slot = st.slots["text"]
            slot.state = "loading"
            slot.say("The engine process stopped (exit code -9). Starting the engines again (1 of 3) ...")
            pg.wait_for_selector("#chat-status:has-text('Starting the engines again')", timeout=10_000)
            wait_enabled(pg, "#chat-send", on=False)
            slot.state = "ready"
            wait_enabled(pg, "#chat-send")
    finally:
        demo.close()


def test_a_restarted_server_gives_the_page_its_kept_chat_and_settings_back(browser, engines):
    """The browser keeps the chat and its settings encrypted with a key the server hands the page. Gradio draws that
    key at random whenever the app is built, so after a server restart no kept chat could be read: a reload showed
    an empty chat in every tab, and wrote the empty chat over the kept one (new-user trial: "a reload lost the whole
    conversation, in both tabs"; the console said "Error reading from localStorage")."""
    from ui.page import build_demo, launch_kwargs

    text, vision = engines

    def launch(port=None):
        st = fake_startup(text, vision, host="127.0.0.1")
        demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
        _, url, _ = demo.launch(**{**launch_kwargs(st.cfg, i18n), **TEST_LAUNCH, "server_port": port})
        return demo, url

    demo, url = launch()
    try:
        with new_page(browser, url) as pg:
            errors = []
            pg.on("console", lambda m: errors.append(m.text) if "localStorage" in m.text else None)
            ready(pg)
            pg.get_by_text("Settings").first.click()
            pg.locator("#chat-system textarea").fill("You answer like a pirate.")
            pg.locator("#chat-system textarea").blur()
            type_and_enter(pg, "keep me across a restart")
            page_has(pg, "You said: keep me across a restart", "#chatbot")
            wait_enabled(pg, "#chat-send")
            second = pg.context.new_page()  # a second tab with its own chat
            second.goto(url)
            ready(second)
            second.locator("#chat-clear").click()
            type_and_enter(second, "the other tab's chat")
            page_has(second, "You said: the other tab's chat", "#chatbot")
            wait_enabled(second, "#chat-send")
            demo.close()
            demo, _ = launch(int(url.rstrip("/").rsplit(":", 1)[1]))  # the same origin: the same storage
            for tab, kept in ((pg, "keep me across a restart"), (second, "the other tab's chat")):
                tab.reload()
                ready(tab)
                page_has(tab, f"You said: {kept}", "#chatbot")
            pg.get_by_text("Settings").first.click()
            assert pg.locator("#chat-system textarea").input_value() == "You answer like a pirate."
            assert not errors, errors
    finally:
        demo.close()
