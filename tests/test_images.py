"""Uploads are checked from the header before decoding, decoded in bounded memory, and keep what they show."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model_loader.errors import BadInput
from ui.images import load_image

# VmHWM (peak RSS of this address space) starts afresh at exec; ru_maxrss would carry the parent's peak over
MEASURE = """
import json, re, sys
from ui.images import load_image
from model_loader.errors import BadInput
def hwm_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = hwm_kib()
try:
    img = load_image(sys.argv[1], int(sys.argv[2]))
    result = list(img.size)
except BadInput as e:
    result = str(e)
after = hwm_kib()
print(json.dumps({"peak_mib": (after - before) / 1024, "result": result}))
"""


def peak_mib(path, max_pixels: int) -> tuple[float, object]:
    """Peak memory (MiB over the interpreter's own) of load_image in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(max_pixels)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return r["peak_mib"], r["result"]


@pytest.fixture(scope="module")
def huge_grey_png(tmp_path_factory):
    """12000x12000 8-bit grey PNG: ~170 KB on disk, 144 MB as grey pixels, 432 MB as RGB."""
    p = tmp_path_factory.mktemp("img") / "huge.png"
    Image.new("L", (12000, 12000), 128).save(p, optimize=False, compress_level=1)
    return p


def test_an_over_limit_upload_is_refused_from_its_header(huge_grey_png):
    peak, result = peak_mib(huge_grey_png, 60_000_000)
    assert "megapixels" in result
    assert peak < 20, f"refusing cost {peak:.0f} MiB: the image was decoded"


def test_a_large_grey_png_within_the_limit_decodes_in_bounded_memory(huge_grey_png):
    peak, result = peak_mib(huge_grey_png, 200_000_000)
    assert result == [1344, 1344]
    # one grey copy (144 MiB) at full size, nothing at RGB (432 MiB) or float size
    assert peak < 200, f"decoding cost {peak:.0f} MiB"


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (8000, 6000), (10, 200, 30)).save(p, quality=80)
    peak, result = peak_mib(p, 60_000_000)
    assert result == [1344, 1008]
    assert peak < 60, f"decoding cost {peak:.0f} MiB (full size is 137 MiB)"


def test_transparency_becomes_white(tmp_path):
    img = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert out.getpixel((20, 20)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0])
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").getpixel((5, 5)) == (255, 255, 255)


def test_16_bit_grey_keeps_its_levels(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    out = np.asarray(load_image(tmp_path / "ramp16.png"))[..., 0]
    assert len(np.unique(out)) > 200, "the levels were flattened"
    assert out[0, 0] == 0 and out[-1, -1] == 255 and abs(int(out[32, 0]) - 128) <= 2
    dark = np.full((8, 8), 1000, np.uint16)
    dark[0, 0] = 60000
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    out = np.asarray(load_image(tmp_path / "dark16.png"))[..., 0]
    assert out[1, 1] == 4 and out[0, 0] == 233  # absolute levels, not stretched


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 60)


def test_missing_file_and_bomb(tmp_path):
    with pytest.raises(BadInput, match="no longer"):
        load_image(tmp_path / "gone.png")
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 MP, over PIL's own bomb limit
    with pytest.raises(BadInput, match="too large|megapixels"):
        load_image(tmp_path / "bomb.png", max_pixels=10**12)


def test_the_same_large_picture_sent_with_every_question_is_decoded_once(launched, tmp_path, monkeypatch):
    """A script sends the picture with each /image_chat call (a new temporary file each time): a 6000x6000 PNG
    took 670-980 ms to its first token every time on the H200, against ~110 ms in the page (issue 12)."""
    from gradio_client import Client, handle_file
    from PIL import Image

    import ui.image_tab
    import ui.images

    decoded = []
    real = ui.images.load_image

    def counting(*a, **kw):
        decoded.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(ui.images, "load_image", counting)
    monkeypatch.setattr(ui.image_tab, "load_image", counting)
    url, _, _ = launched
    c = Client(url, verbose=False)
    p = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), (90, 120, 200)).save(p)
    for q in ("what is it?", "and the colour?"):
        history = [{"role": "user", "content": [{"type": "text", "text": q}]}]
        out = c.predict(handle_file(str(p)), history, 0.2, 16, api_name="/image_chat")
        assert "3000x2000" in str(out[0]) or "1344x896" in str(out[0])
    assert len(decoded) == 1, decoded
