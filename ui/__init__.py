"""The Gradio Blocks UI: one module per tab, plus pure history conversion that imports neither gradio nor lmdeploy."""
