"""The UI's words in English and Chinese; Gradio picks by the browser's language."""

from __future__ import annotations

EN = {
    "chat": "Chat",
    "image_chat": "Image chat",
    "system": "System",
    "message": "Message",
    "message_ph": "Message InternLM2 · Enter to send, Shift+Enter for a new line",
    "chat_placeholder": "**InternLM2-Chat-1.8B** answers here. Try an example below, or type a question.",
    "image_placeholder": "Upload a picture (or pick an example below), then ask LLaVA about it.",
    "send": "Send",
    "busy_enter": "Wait for the reply to finish, or press Stop. Your message stays here.",
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
    "question_ph": "Ask about the image · Enter to send",
    "ask": "Ask",
    "memory": "GPU memory",
    "config": "Configuration (operator only)",
    "examples": "Examples",
}
ZH = {
    "chat": "对话",
    "image_chat": "图片对话",
    "system": "系统",
    "message": "消息",
    "message_ph": "向 InternLM2 提问 · 回车发送，Shift+回车换行",
    "chat_placeholder": "**InternLM2-Chat-1.8B** 会在这里回答。试试下面的示例，或直接输入问题。",
    "image_placeholder": "上传一张图片（或选择下方示例），然后向 LLaVA 提问。",
    "send": "发送",
    "busy_enter": "请等待回答完成，或点击停止。你的消息会保留在这里。",
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
    "question_ph": "关于图片提问 · 回车发送",
    "ask": "提问",
    "memory": "显存",
    "config": "配置（仅管理员可见）",
    "examples": "示例",
}


# What the server writes into the page itself (not through gr.I18n), in the language the browser asks for first
SERVER_TEXT = {
    "en": {
        "unanswered": "Your last message has no reply here (the page was reloaded, or opened, while it was being "
        "written). Press **Regenerate** to get one.",
    },
    "zh": {"unanswered": "最后一条消息在这里还没有回复（回答生成时页面被刷新或新打开）。点击 **重新生成** 即可获得回答。"},
}


def server_text(lang: str, key: str) -> str:
    """One of SERVER_TEXT's lines in `lang` ('zh' or 'en')."""
    return SERVER_TEXT.get(lang, SERVER_TEXT["en"])[key]


def build_i18n():
    """A gr.I18n with both languages (imported lazily: this module stays gradio-free at import)."""
    import gradio as gr  # noqa: PLC0415

    return gr.I18n(en=EN, zh=ZH, **{"zh-CN": ZH})
