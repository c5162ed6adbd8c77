"""What gradio_client hands back can be handed in again (new-user trial of the API): the image chat's history with
its picture, user text exactly as sent, the docs' examples as written."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

WEIRD = "a_b *c* <s>x</s> `code` $x$ & \\n\n# not a heading\n    indented"


def texts(history):
    """Each message's text (an image as '[image]'), as a client reads them."""
    out = []
    for m in history:
        parts = m["content"] if isinstance(m["content"], list) else [m["content"]]
        out.append(" ".join(p if isinstance(p, str) else p.get("text") or "[image]" for p in parts))
    return out


def engine_text(text: str) -> str:
    """What the engine was sent, less the zero-width spaces that break its special tokens (<s>)."""
    return text.replace("\u200b", "")


@pytest.fixture
def picture(tmp_path) -> str:
    path = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), "red").save(path)
    return str(path)


def test_the_image_chat_takes_back_the_history_it_returned(launched, picture):
    """/set_image's history went back to /add_question with pydantic's "'meta' field must be explicitly provided":
    gradio_client downloads the picture and hands back its own path in its place."""
    url, (_, vision), _ = launched
    c = Client(url, verbose=False)
    hist, img = c.predict(handle_file(picture), [], api_name="/set_image")
    _, hist = c.predict("What is it?", hist, handle_file(img), api_name="/add_question")
    hist, _ = c.predict(handle_file(img), hist, 0.2, 64, api_name="/image_chat")
    _, hist = c.predict("And its colour?", hist, handle_file(img), api_name="/add_question")
    hist, stats = c.predict(handle_file(img), hist, 0.2, 64, api_name="/image_chat")
    assert texts(hist) == [
        "[image]",
        "What is it?",
        "I see an image of 40x30 and you asked: What is it?",
        "And its colour?",
        "You said: And its colour?",  # the fake engine answers the last message; the picture is on the first
    ]
    assert "tokens" in stats
    assert Image.open(hist[0]["content"][0]["file"]).size == (40, 30)  # still the picture, served again
    # a new picture on the same chat starts a new topic; the first one stays a picture
    hist, img2 = c.predict(handle_file(picture), hist, api_name="/set_image")
    assert texts(hist)[-1] == "[image]" and Image.open(hist[0]["content"][0]["file"]).size == (40, 30)
    first, *_, last = vision.calls[-1][1]
    assert first["content"][1]["image"].size == (40, 30) and last["content"] == "And its colour?"


def test_a_history_cannot_name_a_server_file(launched, picture):
    """A file part is the client's own copy of a picture: its path never names a file on the server."""
    url, _, _ = launched
    c = Client(url, verbose=False)
    secret = str(Path(__file__).resolve())  # a file the server could read
    hist = [{"role": "user", "content": [{"type": "file", "file": secret}]}]
    _, out = c.predict("What is it?", hist, handle_file(picture), api_name="/add_question")
    for part in out[0]["content"]:
        if part.get("type") == "file":
            assert Path(part["file"]).read_bytes() != Path(secret).read_bytes()


@pytest.mark.parametrize(
    "history",
    [
        [{"role": "user", "content": [{"type": "banana"}]}],
        [{"content": "hi"}],
        "not a list",
    ],
)
def test_a_history_that_is_not_a_chat_gets_a_named_refusal(launched, picture, capfd, history):
    url, _, _ = launched
    c = Client(url, verbose=False)
    for call in (
        lambda: c.predict("What is it?", history, handle_file(picture), api_name="/add_question"),
        lambda: c.predict(history, "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat"),
    ):
        with pytest.raises(Exception) as e:
            call()
        assert "The history is not a chat" in str(e.value), str(e.value)
        assert "pydantic" not in str(e.value) and "validation error" not in str(e.value)
        assert "&" not in str(e.value), str(e.value)  # readable as it is: no HTML entities (review)
    assert "Traceback" not in capfd.readouterr().err


def test_user_text_comes_back_exactly_as_sent(launched, picture):
    """User messages came back Markdown-escaped, behind a U+2060: the page's way of showing them literally."""
    url, (text, vision), _ = launched
    c = Client(url, verbose=False)
    _, hist = c.predict(WEIRD, [], api_name="/add_message")
    assert texts(hist) == [WEIRD]
    hist, _ = c.predict(hist, "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert texts(hist)[0] == WEIRD and engine_text(text.calls[-1][1][-1]["content"]) == WEIRD
    assert texts(c.predict(hist, api_name="/regenerate")) == [WEIRD]
    hist, box, _, _ = c.predict(hist, api_name="/undo")
    assert hist == [] and box == WEIRD
    _, saved = c.predict([{"role": "user", "content": WEIRD}], api_name="/stop")
    assert texts(saved) == [WEIRD]
    # the image chat too
    hist, img = c.predict(handle_file(picture), [], api_name="/set_image")
    _, hist = c.predict(WEIRD, hist, handle_file(img), api_name="/add_question")
    assert texts(hist)[1] == WEIRD
    hist, _ = c.predict(handle_file(img), hist, 0.2, 64, api_name="/image_chat")
    assert texts(hist)[1] == WEIRD
    assert engine_text(vision.calls[-1][1][-1]["content"][0]["text"]) == WEIRD


def test_histories_the_api_returned_before_still_read_as_typed(launched):
    """Earlier clients were told to send user messages back as they came (escaped, marked): still taken as typed."""
    url, (text, _), _ = launched
    c = Client(url, verbose=False)
    old = [{"role": "user", "content": "\u2060a\\_b \\*c\\*"}]
    hist, _ = c.predict(old, "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert texts(hist)[0] == "a_b *c*" and text.calls[-1][1][-1]["content"] == "a_b *c*"


def test_an_empty_chat_has_nothing_to_export(launched):
    """An empty chat exported a 15-byte file ("# Conversation")."""
    url, _, _ = launched
    c = Client(url, verbose=False)
    for route in ("/export_markdown", "/export_json"):
        with pytest.raises(Exception, match="nothing to download"):
            c.predict([], api_name=route)


DOCS = Path(__file__).resolve().parent.parent / "docs"


def snippets(path: Path) -> list[str]:
    """The Python blocks of a Markdown file that call the API."""
    blocks = path.read_text(encoding="utf-8").split("```python\n")[1:]
    return [b.split("\n```", 1)[0] for b in blocks if "gradio_client" in b]


def test_the_docs_api_example_runs_and_keeps_the_default_system_prompt(launched, picture, monkeypatch, tmp_path):
    """docs/design.md passed "" as the system prompt, which leaves InternLM2 without the page's system prompt: a
    copy-paste must give the default behaviour."""
    from ui.chat_tab import DEFAULT_SYSTEM

    url, (text, vision), _ = launched
    (code,) = snippets(DOCS / "design.md")
    Image.open(picture).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:7860/", url), "docs/design.md", "exec"), {})
    assert len(text.calls) == 2 and vision.calls
    for _, messages, _ in text.calls:
        assert messages[0] == {"role": "system", "content": DEFAULT_SYSTEM}


def test_each_sampling_setting_is_named_in_the_api(launched):
    """/chat and /image_chat take their settings in different orders (kept, for the scripts written against them);
    each is named, so a script can pass them by name."""
    url, _, _ = launched
    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {route: [p["parameter_name"] for p in api[route]["parameters"]] for route in ("/chat", "/image_chat")}
    settings = ["temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed"]
    assert names["/chat"] == ["history", "system_prompt", *settings]
    assert names["/image_chat"] == [
        "image",
        "history",
        "temperature",
        "max_new_tokens",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
    ]


def test_a_picture_removed_meanwhile_does_not_fail_the_lookup(tmp_path):
    """A parallel call of the same session may clear its old pictures while this one looks them up (review)."""
    from ui.chatbot import CLIENT_COPY
    from ui.image_tab import own_pictures

    (tmp_path / "a").mkdir()
    kept = tmp_path / "a" / "cat.png"
    kept.write_bytes(b"png")
    (tmp_path / "a" / "gone.png").symlink_to(tmp_path / "a" / "removed.png")  # listed, then gone when looked at
    part = {"type": "file", "file": {"path": CLIENT_COPY + "cat.png", "meta": {"_type": "gradio.FileData"}}}
    history = [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]
    out = own_pictures(history, None, tmp_path)
    assert out[0]["content"][0]["file"]["path"] == str(kept)


def test_a_refusal_reads_plainly_to_an_api_client(launched):
    """Refusals are escaped for the page, which shows them as HTML; an apostrophe came back to scripts as &#x27;
    (new-user trial). Only what HTML needs escaped in text is: <, > and &."""
    url, _, _ = launched
    c = Client(url, verbose=False)
    too_long = [{"role": "user", "content": "x " * 20_000}]
    with pytest.raises(Exception) as e:
        c.predict(too_long, "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert "model's" in str(e.value) and "&#" not in str(e.value), str(e.value)
