"""What Gradio 6 itself does, pinned in a real browser, so the app's design rests on facts rather than hopes.

If Gradio changes one of these, the test says which assumption of ui/ no longer holds.
"""

from __future__ import annotations

import gradio as gr
import pytest

from tests.browser import chromium_page, skip_without_chromium

pytestmark = skip_without_chromium


def _app() -> gr.Blocks:
    def refuse(_):
        raise gr.Error("Readable refusal text", title="Refused")

    def ok(x):
        return x

    with gr.Blocks() as demo:
        box = gr.Textbox(elem_id="box")
        out = gr.Textbox(elem_id="out")
        unqueued = gr.Button("unqueued", elem_id="unqueued")
        queued = gr.Button("queued", elem_id="queued")
        unqueued.click(refuse, box, out, queue=False)
        ev = queued.click(refuse, box, out)
        # after an error Gradio runs .failure() listeners but not .then() ones
        ev.then(lambda: "then ran", None, out)
        ev.failure(lambda: "failure ran", None, box)
    return demo


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    demo = _app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", _frontend=False)
    yield url
    demo.close()


def test_an_error_in_an_unqueued_event_shows_no_text_but_a_queued_one_does(tiny_app):
    with chromium_page(tiny_app) as pg:
        pg.click("#unqueued")
        pg.wait_for_selector(".toast-body, [data-testid='toast-body'], .error", timeout=5000)
        pg.wait_for_timeout(300)
        assert "Readable refusal text" not in pg.inner_text("body")
        pg.click("#queued")
        pg.wait_for_function("document.body.innerText.includes('Readable refusal text')")
        pg.wait_for_function("document.querySelector('#box textarea').value === 'failure ran'")
        assert pg.input_value("#out textarea") != "then ran"
