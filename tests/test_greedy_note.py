"""At temperature 0 the sliders that do nothing say so under the reply (issue 12, item 9)."""

from __future__ import annotations

from gradio_client import Client

from ui.conversation import settings_note


def msg(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_settings_note_names_the_sliders():
    assert settings_note([]) == ""
    assert settings_note(["top_p", "top_k", "seed"]) == "Top-p, Top-k and Seed have no effect at temperature 0"
    assert "Temperature" in settings_note(["temperature", "top_p"]) and "top-k 1" in settings_note(["temperature"])


def test_greedy_reply_says_which_sliders_do_nothing(launched):
    url, _, _ = launched
    c = Client(url, verbose=False)
    _, greedy = c.predict(msg("hello"), "", 0.0, 0.8, 40, 32, 1.0, 0, api_name="/chat")
    assert "Top-p, Top-k have no effect at temperature 0" in greedy.replace(" and ", ", ")
    _, sampled = c.predict(msg("hello"), "", 0.7, 0.8, 40, 32, 1.0, 0, api_name="/chat")
    assert "no effect" not in sampled


def test_the_image_tab_has_the_same_sampling_settings_and_note(launched, tmp_path):
    """The image tab used to send top-p 0.8, top-k 40 and no penalty whatever the user wanted (issue 12, item 9)."""
    from gradio_client import handle_file
    from PIL import Image

    url, (_, vision), _ = launched
    c = Client(url, verbose=False)
    p = tmp_path / "cat.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(p)
    c.predict(handle_file(str(p)), msg("what is it?"), 0.7, 32, 0.5, 7, 1.2, 11, api_name="/image_chat")
    settings = vision.calls[-1][2]
    assert (settings.top_p, settings.top_k, settings.repetition_penalty, settings.seed) == (0.5, 7, 1.2, 11)
    _, greedy = c.predict(handle_file(str(p)), msg("and now?"), 0.0, 32, 0.5, 7, 1.0, 0, api_name="/image_chat")
    assert "Top-p, Top-k have no effect at temperature 0" in greedy.replace(" and ", ", ")
