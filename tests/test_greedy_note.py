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
