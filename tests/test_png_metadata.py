"""PNG metadata without a model: A1111 infotext written and parsed back, and a malformed attribution
record refused naming the file (the round trip through a generated image is in test_generate.py)."""

from __future__ import annotations

from PIL import Image

from das_sd.png_metadata import infotext, parse_infotext, read_png_metadata


def test_a1111_infotext_is_parsed(tmp_path):
    text = infotext({"prompt": "a cat\nwith two lines", "negative_prompt": "dog", "steps": 20,
                     "scheduler": "Euler a", "guidance": 7.0, "seed": 42, "width": 512, "height": 512})
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "a cat\nwith two lines" and parsed["negative_prompt"] == "dog"
    assert parsed["seed"] == 42 and parsed["steps"] == 20 and parsed["guidance"] == 7.0
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png") == {}


def test_a_malformed_attribution_record_is_an_image_error_naming_the_file(tmp_path):
    import pytest
    from PIL.PngImagePlugin import PngInfo

    from das_sd.data.images import ImageError
    from das_sd.png_metadata import PNG_ATTRIBUTION_KEY, read_png_attribution

    info = PngInfo()
    info.add_text(PNG_ATTRIBUTION_KEY, "{not json")
    path = tmp_path / "bad-record.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    with pytest.raises(ImageError, match="bad-record.png: its 'das_sd_attribution' record is not valid JSON"):
        read_png_attribution(path)
    Image.new("RGB", (4, 4)).save(tmp_path / "none.png")
    assert read_png_attribution(tmp_path / "none.png") is None
