"""The UI's words in English and Chinese; Gradio picks by the browser's language."""

from __future__ import annotations

EN = {
    "chat": "Chat",
    "image_chat": "Image chat",
    "system": "System",
    "message": "Message",
    "message_ph": "Ask InternLM2 anything (Enter to send, Shift+Enter for a new line)",
    "send": "Send",
    "stop": "Stop",
    "regenerate": "Regenerate",
    "undo": "Undo",
    "clear": "Clear",
    "system_prompt": "System prompt",
    "settings": "Sampling settings",
    "temperature": "Temperature (0 = greedy)",
    "top_p": "Top-p",
    "top_k": "Top-k",
    "max_new_tokens": "Max new tokens",
    "repetition_penalty": "Repetition penalty",
    "seed": "Seed (0 = random)",
    "export": "Download conversation",
    "export_md": "Markdown",
    "export_json": "JSON",
    "image": "Image (click, drop or paste)",
    "question": "Question about the image",
    "question_ph": "What is in this image?",
    "ask": "Ask",
    "memory": "GPU memory",
    "examples": "Examples",
}
ZH = {
    "chat": "对话",
    "image_chat": "图片对话",
    "system": "系统",
    "message": "消息",
    "message_ph": "向 InternLM2 提问（回车发送，Shift+回车换行）",
    "send": "发送",
    "stop": "停止",
    "regenerate": "重新生成",
    "undo": "撤销",
    "clear": "清空",
    "system_prompt": "系统提示词",
    "settings": "采样设置",
    "temperature": "温度（0 为贪心）",
    "top_p": "Top-p",
    "top_k": "Top-k",
    "max_new_tokens": "最大生成长度",
    "repetition_penalty": "重复惩罚",
    "seed": "随机种子（0 为随机）",
    "export": "下载对话",
    "export_md": "Markdown",
    "export_json": "JSON",
    "image": "图片（点击、拖放或粘贴）",
    "question": "关于图片的问题",
    "question_ph": "这张图片里有什么？",
    "ask": "提问",
    "memory": "显存",
    "examples": "示例",
}


def build_i18n():
    """A gr.I18n with both languages (imported lazily: this module stays gradio-free at import)."""
    import gradio as gr  # noqa: PLC0415

    return gr.I18n(en=EN, zh=ZH, **{"zh-CN": ZH})
