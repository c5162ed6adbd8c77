"""Pure history/image functions, the handlers with the fake engine, and the launched app via gradio_client."""

from __future__ import annotations

import threading

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from model_loader.errors import BadInput
from tests.fakes import FakeEngine
from ui import conversation
from ui.images import load_image


def msg(text, role="user"):
    return {"role": role, "content": [{"type": "text", "text": text}]}


def test_exports():
    h = [msg("你好"), msg("hello", "assistant")]
    assert "**User**" in conversation.to_markdown(h) and "你好" in conversation.to_json(h)


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "I;16", "P", "LA", "1"])
def test_unusual_images_become_rgb(tmp_path, mode):
    img = Image.new(mode, (40, 30))
    p = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_gif_large_and_bad_uploads(tmp_path):
    Image.new("P", (10, 10)).save(tmp_path / "a.gif")
    assert load_image(tmp_path / "a.gif").mode == "RGB"
    Image.new("RGB", (4000, 3000)).save(tmp_path / "big.jpg")
    assert max(load_image(tmp_path / "big.jpg").size) == 1344
    (tmp_path / "t.png").write_bytes(b"not an image at all")
    with pytest.raises(BadInput, match="not an image"):
        load_image(tmp_path / "t.png")
    Image.new("RGB", (200, 200)).save(tmp_path / "c.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "c.png").read_bytes()[:100])
    with pytest.raises(BadInput):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(BadInput, match="megapixels"):
        load_image(tmp_path / "big.jpg", max_pixels=1_000_000)


def test_image_bomb_header_is_refused(tmp_path):
    Image.new("1", (10000, 6000)).save(tmp_path / "bomb.png")  # 60 MP, a few KB on disk
    with pytest.raises(BadInput):
        load_image(tmp_path / "bomb.png", max_pixels=50_000_000)


# ---- the launched app, driven like a browser would through gradio_client ----


def chat(client, text, max_new=64):
    return client.submit([msg(text)], "", 0.7, 0.8, 40, max_new, 1.0, 0, api_name="/chat")


def reply_text(history):
    c = history[-1]["content"]
    return c[0]["text"] if isinstance(c, list) else c


def test_streaming_reply(launched):
    url, (text, _), _ = launched
    c = Client(url, verbose=False)
    job = chat(c, "hello there friend")
    updates = [reply_text(u[0]) for u in job if u[0] and u[0][-1]["role"] == "assistant"]
    final = job.outputs()[-1]
    assert reply_text(final[0]) == "You said: hello there friend"
    assert len(set(updates)) >= 2, "the reply did not stream"
    assert "tokens/s" in final[1] and "first token" in final[1]


def test_stop_stops_the_engine(launched):
    url, (text, _), _ = launched
    text.delay_s = 0.05
    text.enqueue(" ".join(f"w{i}" for i in range(400)))
    c = Client(url, verbose=False)
    chat(c, "long please", max_new=400)
    import concurrent.futures
    import time

    deadline = time.monotonic() + 20
    while text.active_sessions() == 0 and time.monotonic() < deadline:  # until the reply is streaming
        time.sleep(0.02)
    try:
        c.predict(api_name="/stop")
    except concurrent.futures.CancelledError:
        pass  # the client sees its running job cancelled, as a browser does
    while (not text.stopped or text.active_sessions()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert text.stopped and text.active_sessions() == 0


def test_regenerate_and_empty_message(launched):
    url, (text, _), _ = launched
    c = Client(url, verbose=False)
    hist = [msg("q1"), msg("old answer", "assistant")]
    out = c.predict(hist, api_name="/regenerate")
    assert out[-1]["role"] == "user"
    with pytest.raises(Exception, match="type a message"):
        c.predict("   ", [], api_name="/add_message")


def test_image_chat(launched, tmp_path):
    url, (_, vision), _ = launched
    c = Client(url, verbose=False)
    p = tmp_path / "cat.png"
    Image.new("RGBA", (800, 600), (10, 20, 30, 128)).save(p)
    hist, _ = c.predict(handle_file(str(p)), [], api_name="/set_image")
    assert hist and hist[0]["role"] == "user"
    out = c.predict(handle_file(str(p)), [msg("What is in this image?")], 0.2, 64, api_name="/image_chat")
    assert reply_text(out[0]) == "I see an image of 800x600 and you asked: What is in this image?"
    bad = tmp_path / "notes.png"
    bad.write_text("just text")
    with pytest.raises(Exception):  # noqa: B017 - refused with an error, never a crash of the app
        c.predict(handle_file(str(bad)), [], api_name="/set_image")
    assert c.predict(api_name="/status")["vision"]["state"] == "ready"


def test_concurrent_clients_never_mix(launched):
    url, (text, _), _ = launched
    n = 12
    results = [None] * n

    def user(i):
        c = Client(url, verbose=False)
        results[i] = [reply_text(chat(c, f"I am user {i} turn {t}").result(timeout=60)[0]) for t in range(2)]

    threads = [threading.Thread(target=user, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert r == [f"You said: I am user {i} turn {t}" for t in range(2)]


def test_failed_engine_explains_itself():
    from tests.conftest import fake_startup
    from ui.streaming import engine_or_error

    st = fake_startup(FakeEngine("text"), None)
    with pytest.raises(Exception, match="failed to start"):
        engine_or_error(st.slots["vision"])
    assert engine_or_error(st.slots["text"]) is st.slots["text"].engine


def test_update_interval_grows_with_load():
    from ui.streaming import ui_interval

    assert ui_interval(1) == ui_interval(8) == 0.05
    assert ui_interval(16) == 0.1 and ui_interval(32) == 0.2 and ui_interval(500) == 0.25


def test_token_upper_bound_is_an_upper_bound(tiny_models):
    from lmdeploy.tokenizer import Tokenizer

    tok = Tokenizer(str(tiny_models["awq"]))
    for text in ("hello world", "上海是中国的一座城市。你好", "def f(x):\n    return x * 2  # ✓", "w" * 500):
        msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": text}]
        prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        assert len(tok.encode(prompt)) <= conversation.token_upper_bound(msgs)


def test_stop_with_nothing_running_says_so(launched):
    """A Stop that finds no reply of this chat running must not claim it stopped one (new-user trial)."""
    url, _, _ = launched
    note, _ = Client(url, verbose=False).predict([], api_name="/stop")
    assert "Stopped" not in note and "nothing" in note.lower()
