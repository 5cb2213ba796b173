"""Untrusted images: decompression bombs are refused from their header, errors name the file (never
an object repr), fully transparent queries are refused; long prompts are reported, not echoed whole."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from das_sd.data import images
from das_sd.data.images import ImageError, decode, is_fully_transparent, load_image, open_image

ROOT = Path(__file__).resolve().parents[1]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` and whose pixel data stops after a few rows:
    a few hundred bytes, cheap to write; only a decoder would find out it is truncated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


@pytest.fixture()
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test: refusals must come from the header."""
    def load(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("size", [(22000, 22000), (9000, 9000)])  # over PIL's own limit / over das-sd's only
def test_oversized_images_are_refused_from_the_header(tmp_path, no_decoding, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(*size))
    assert path.stat().st_size < 2000
    for read in (lambda: load_image(path), lambda: open_image(path), lambda: decode(path.read_bytes(), "bomb.png")):
        with pytest.raises(ImageError, match=r"bomb\.png: image of .* pixels, over das-sd's limit of 64 megapixels"):
            read()
    with pytest.raises(ImageError, match=r"the uploaded image: image of .*pixels"):
        open_image(path.read_bytes())
    w, h = size
    with pytest.raises(ImageError, match=f"{w}x{h}|{w * h:,}"):
        open_image(path)


def test_the_pixel_limit_is_a_parameter_and_an_environment_variable(tmp_path):
    Image.new("RGB", (100, 100), "red").save(tmp_path / "ok.png")
    assert open_image(tmp_path / "ok.png").size == (100, 100)
    with pytest.raises(ImageError, match="100x100 pixels"):
        open_image(tmp_path / "ok.png", max_pixels=5000)
    code = ("from das_sd.data.images import MAX_IMAGE_PIXELS, open_image, ImageError\n"
            f"assert MAX_IMAGE_PIXELS == 5000, MAX_IMAGE_PIXELS\n"
            f"try:\n open_image({str(tmp_path / 'ok.png')!r})\nexcept ImageError as e:\n print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"DAS_SD_MAX_IMAGE_PIXELS": "5000", "PATH": "", "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert "0.005 megapixels" in out.stdout


def test_a_bomb_costs_no_memory(tmp_path):
    """The reported case: a 22000 x 22000 PNG took the app from 0.6 to 2.5 GB before being refused."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(22000, 22000))
    code = ("import resource, sys\nfrom das_sd.data.images import load_image, ImageError\n"
            "from das_sd.png_metadata import read_png_metadata\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for read in (load_image, read_png_metadata):\n"
            "    try:\n        read(sys.argv[1])\n        sys.exit('decoded')\n    except ImageError:\n        pass\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PATH": "", "OMP_NUM_THREADS": "1"})
    assert int(out.stdout) < 50_000  # KiB: nowhere near the 484 MB (RGB: 1.45 GB) of pixels


def test_errors_name_the_image_never_an_object_repr(tmp_path):
    for data in (b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, png_header(64, 64)):
        with pytest.raises(ImageError) as raised:
            decode(data)
        message = str(raised.value)
        assert message.startswith("the uploaded image: not a readable image"), message
        assert "BytesIO" not in message and " at 0x" not in message and "object" not in message
    with pytest.raises(ImageError, match="x.png: not a readable image"):
        decode(b"junk", "x.png")
    with pytest.raises(ImageError, match="missing.png: cannot read the image"):
        load_image(tmp_path / "missing.png")


def test_images_keep_their_metadata_and_load_fully(tmp_path):
    from das_sd.png_metadata import png_bytes, read_png_metadata

    path = tmp_path / "gen.png"
    path.write_bytes(png_bytes(Image.new("RGB", (32, 32), "blue"), {"prompt": "a blue square"}))
    image = open_image(path)
    assert image.text["parameters"].startswith("a blue square") and image.getpixel((0, 0)) == (0, 0, 255)
    assert read_png_metadata(path)["prompt"] == "a blue square"


def test_full_transparency_is_detected(tmp_path):
    assert is_fully_transparent(Image.new("RGBA", (8, 8), (10, 20, 30, 0)))
    assert is_fully_transparent(Image.new("LA", (8, 8), (10, 0)))
    assert not is_fully_transparent(Image.new("RGB", (8, 8)))
    partly = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    partly.putpixel((3, 3), (0, 0, 0, 1))
    assert not is_fully_transparent(partly)
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    assert is_fully_transparent(open_image(tmp_path / "p.png"))


def test_long_prompts_are_counted_and_shortened(base_path):
    from transformers import CLIPTokenizer

    from das_sd.generation import dropped_prompt_tokens, shorten, truncation_note

    tokenizer = CLIPTokenizer.from_pretrained(base_path / "tokenizer")
    assert dropped_prompt_tokens(tokenizer, "a red circle") == 0 and truncation_note(tokenizer, "a red circle") is None
    long = "a red circle on a blue background " * 300  # 10,200 characters
    dropped = dropped_prompt_tokens(tokenizer, long)
    assert dropped == len(tokenizer(long, verbose=False)["input_ids"]) - tokenizer.model_max_length > 1000
    assert f"its last {dropped} tokens had no effect" in truncation_note(tokenizer, long)
    short = shorten(long, 200)
    assert len(short) == 200 and short.endswith("…") and shorten("a red circle") == "a red circle"


def test_the_module_never_lowers_pils_own_limit():
    # a host process (webui, ComfyUI, InvokeAI) shares PIL's global: das-sd may only raise it
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= min(images.MAX_IMAGE_PIXELS, 89_478_485)


@pytest.mark.parametrize("size", [(7999, 7999), (64, 48)])  # just under the pixel cap / merely not the store's size
def test_a_query_of_another_size_is_refused_from_the_header(tmp_path, no_decoding, size):
    """A query must have the store's resolution: a 7999 x 7999 PNG (265 kB) took the app from 0.66 to
    1.9 GB, decoded in full before being refused for its size."""
    from das_sd.attribute import Attributor, QueryError

    from types import SimpleNamespace

    attributor = Attributor.__new__(Attributor)  # the size check needs no model, only the store's identity
    attributor.resolution = 32
    attributor.store = SimpleNamespace(identity={"resolution": 32})
    path = tmp_path / "query.png"
    path.write_bytes(png_header(*size))
    w, h = size
    with pytest.raises(QueryError, match=f"query.png: image is {w}x{h}; this store's model works at 32x32"):
        attributor.image_query(path, prompt="a prompt")


def _rgba_png(path: Path, size: int) -> None:
    pixels = np.zeros((size, size, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 200, 255
    pixels[10:50, 10:90] = (10, 20, 30, 128)
    Image.fromarray(pixels, "RGBA").save(path)


@pytest.mark.parametrize("step, bound", [("dataset", 1.5), ("featurize", 3.0)])  # was 5.0 and 5.0
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc")
def test_a_large_training_image_is_decoded_without_full_size_copies(tmp_path, step, bound):
    """A large training image is legitimate, but reading it costs its decoded size (RGBA: 4 bytes a
    pixel), plus the RGB image for featurizing: no converted copies (it was five of them)."""
    size = 4000
    path = tmp_path / "large.png"
    _rgba_png(path, size)
    # the peak from /proc (VmHWM): ru_maxrss would start from pytest's own peak, kept across exec
    code = ("import sys\nfrom pathlib import Path\nfrom das_sd.data import images\n"
            "from das_sd.data.datasets import _Collector\npath = Path(sys.argv[2])\n"
            "def peak():\n    status = Path('/proc/self/status').read_text()\n"
            "    return int(status.split('VmHWM:')[1].split()[0])\n"
            "before = peak()\n"
            "if sys.argv[1] == 'dataset':  # open_dataset checks every image\n"
            "    _Collector(path.parent, skip_bad=False).add(path, 'a caption', None)\n"
            "else:\n    images.to_model_input(images.load_image(path), 32)\n"
            "print(peak() - before)\n")
    out = subprocess.run([sys.executable, "-c", code, step, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PATH": "", "OMP_NUM_THREADS": "1"})
    decoded_kib = size * size * 4 / 1024
    assert int(out.stdout) < bound * decoded_kib, (int(out.stdout) / decoded_kib, step)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P", "RGBa", "I;16", "I", "F"])
def test_conversion_in_strips_equals_converting_at_once(monkeypatch, mode):
    """to_rgb converts large images a strip at a time: the pixels are those of the whole-image
    conversion (composited on white; 16-bit and float scaled by the whole image's peak)."""
    rng = np.random.default_rng(0)
    w, h = 37, 23
    if mode in ("I;16", "I", "F"):
        values = rng.integers(0, 3000, (h, w)) if mode != "I;16" else rng.integers(0, 65536, (h, w))
        values[-1, -1] = 2999 if mode != "I;16" else values[-1, -1]  # the peak in the last strip only
        image = Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        whole = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode == "I;16" or whole.max() > 255 else 255.0
        expected = Image.fromarray(np.clip(whole / peak * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        if mode == "P":
            image = image.convert("RGB").quantize(40)
            image.info["transparency"] = 5
        elif mode != "RGBA":
            image = image.convert(mode)
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        expected = Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    monkeypatch.setattr(images, "STRIP_PIXELS", 3 * w)  # eight strips, the last one short
    assert np.array_equal(np.asarray(images.to_rgb(image)), np.asarray(expected))
