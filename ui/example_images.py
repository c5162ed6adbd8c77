"""Example pictures for the Image chat tab, drawn here with PIL (no downloaded photos), each with a question."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (640, 480)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def shapes() -> Image.Image:
    """Three coloured shapes on white."""
    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    d.ellipse((60, 150, 230, 320), fill=(220, 40, 40))
    d.rectangle((260, 160, 410, 310), fill=(30, 90, 220))
    d.polygon([(520, 140), (610, 320), (430, 320)], fill=(40, 170, 70))
    return img


def bar_chart() -> Image.Image:
    """A labelled bar chart of visitors per month."""
    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    d.text((SIZE[0] // 2, 28), "Visitors per month", fill="black", font=_font(28), anchor="mm")
    months, values = ["Jan", "Feb", "Mar", "Apr", "May"], [120, 180, 90, 260, 210]
    x0, y0, top = 80, 420, 80
    d.line((x0, top, x0, y0), fill="black", width=2)
    d.line((x0, y0, 600, y0), fill="black", width=2)
    scale = (y0 - top - 20) / 300
    for i, (m, v) in enumerate(zip(months, values)):
        left = x0 + 25 + i * 100
        d.rectangle((left, y0 - v * scale, left + 60, y0), fill=(79, 70, 229) if v == max(values) else (148, 163, 184))
        d.text((left + 30, y0 - v * scale - 14), str(v), fill="black", font=_font(18), anchor="mm")
        d.text((left + 30, y0 + 18), m, fill="black", font=_font(18), anchor="mm")
    return img


def house() -> Image.Image:
    """A house under the sun, with a tree."""
    img = Image.new("RGB", SIZE, (190, 225, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 360, SIZE[0], SIZE[1]), fill=(110, 180, 90))
    d.ellipse((500, 40, 590, 130), fill=(250, 200, 40))
    d.rectangle((150, 230, 350, 380), fill=(230, 200, 160))
    d.polygon([(130, 235), (250, 140), (370, 235)], fill=(180, 60, 50))
    d.rectangle((225, 300, 275, 380), fill=(120, 80, 40))
    d.rectangle((170, 260, 210, 295), fill=(255, 255, 255))
    d.rectangle((470, 260, 495, 380), fill=(110, 75, 40))
    d.ellipse((420, 170, 545, 290), fill=(40, 130, 60))
    return img


EXAMPLES = [
    ("shapes.png", shapes, "How many shapes are there, and what colour is each?"),
    ("chart.png", bar_chart, "Which month had the most visitors, and how many?"),
    ("house.png", house, "这张图里画了什么？"),
]


def write_examples(folder: Path) -> list[tuple[str, str]]:
    """Draw the examples into `folder`; returns (image path, question) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, draw, question in EXAMPLES:
        path = folder / name
        draw().save(path)
        out.append((str(path), question))
    return out
