from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from das_sd.data.datasets import DatasetError, open_dataset, sample_key, skipped_note
from das_sd.io import json_error, printable
from das_sd.data.images import ImageError, load_image, resize_center_crop, to_model_input


def _rgb(seed: int, size=(32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)


def _imagefolder(root: Path, rows: list[dict], images: dict[str, Image.Image]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_imagefolder_reads_captions_and_keys_from_bytes(tmp_path):
    images = {f"img{i}.png": Image.fromarray(_rgb(i)) for i in range(3)}
    rows = [{"file_name": n, "text": f"caption {i}", "contributor": f"c{i % 2}"} for i, n in enumerate(images)]
    ds = open_dataset(_imagefolder(tmp_path / "d", rows, images))
    assert ds.format == "imagefolder" and len(ds) == 3
    for i, s in enumerate(ds):
        data = (tmp_path / "d" / f"img{i}.png").read_bytes()
        expected = hashlib.sha256(data + b"\0" + f"caption {i}".encode()).hexdigest()[:20]
        assert s.key == expected and s.caption == f"caption {i}"
        assert s.metadata == {"contributor": f"c{i % 2}"}


def test_keys_do_not_depend_on_order_and_duplicates_stay_distinct(tmp_path):
    images = {f"img{i}.png": Image.fromarray(_rgb(i)) for i in range(3)}
    images["copy.png"] = Image.fromarray(_rgb(0))
    rows = [{"file_name": n, "text": "same" if n in ("img0.png", "copy.png") else n} for n in images]
    a = open_dataset(_imagefolder(tmp_path / "a", rows, images))
    b = open_dataset(_imagefolder(tmp_path / "b", rows[::-1], images))
    by_name_a = {s.relpath: s.key for s in a}
    by_name_b = {s.relpath: s.key for s in b}
    assert by_name_a["img1.png"] == by_name_b["img1.png"]
    assert by_name_a["img0.png"] != by_name_a["copy.png"]  # exact duplicate: second gets ~2
    assert by_name_a["copy.png"] == by_name_a["img0.png"] + "~2"
    assert a.fingerprint() != b.fingerprint()  # the fingerprint is of the ordered keys


def test_caption_column_and_caption_lists(tmp_path):
    images = {"a.png": Image.fromarray(_rgb(1)), "b.png": Image.fromarray(_rgb(2))}
    rows = [{"file_name": "a.png", "prompt": ["", "first real", "second"]}, {"file_name": "b.png", "prompt": "plain"}]
    ds = open_dataset(_imagefolder(tmp_path / "d", rows, images), caption_column="prompt")
    assert [s.caption for s in ds] == ["first real", "plain"]


def test_metadata_csv_and_train_split(tmp_path):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    Image.fromarray(_rgb(3)).save(root / "train" / "x.png")
    (root / "train" / "metadata.csv").write_text("file_name,text\nx.png,\"a caption, with comma\"\n")
    ds = open_dataset(root)
    assert [s.caption for s in ds] == ["a caption, with comma"]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P-transparent", "RGBA", "CMYK", "I;16", "I", "1"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(_rgb(4))
    if mode == "P-transparent":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        ext = ".png"
    elif mode == "CMYK":
        image, ext = rgb.convert("CMYK"), ".jpg"
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257), "I;16")
        ext = ".png"
    elif mode == "I":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 257, "I")
        ext = ".png"
    else:
        image, ext = rgb.convert(mode), ".png"
    path = tmp_path / f"img{ext}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (32, 32)
    if mode in ("I;16", "I", "L"):
        # 16-bit grey must be scaled to 8 bits, not clipped: it matches the 8-bit grey original
        grey = np.asarray(rgb.convert("L"), dtype=np.int32)
        assert np.abs(np.asarray(loaded)[..., 0].astype(np.int32) - grey).max() <= 1
    if mode == "RGBA":
        assert np.array_equal(np.asarray(loaded), np.asarray(rgb))  # opaque alpha: colours unchanged


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (np.asarray(load_image(tmp_path / "t.png")) == 255).all()


def test_resize_and_center_crop():
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, 20:60] = 255  # the centre half is white
    out = resize_center_crop(Image.fromarray(wide), 16)
    assert out.size == (16, 16)
    assert np.asarray(out).mean() > 240  # only the white centre survives the crop
    arr = to_model_input(Image.fromarray(wide), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.float32 and -1 <= arr.min() and arr.max() <= 1


def _bad_folder(tmp_path: Path) -> Path:
    good = {f"g{i}.png": Image.fromarray(_rgb(10 + i)) for i in range(2)}
    root = _imagefolder(tmp_path / "bad", [], good)
    data = (root / "g0.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "corrupt.png").write_bytes(b"not an image at all")
    lines = [
        json.dumps({"file_name": "g0.png", "text": "ok 0"}),
        "{this is not json",
        json.dumps({"file_name": "truncated.png", "text": "t"}),
        json.dumps({"file_name": "corrupt.png", "text": "c"}),
        json.dumps({"file_name": "g1.png"}),
        json.dumps({"file_name": "missing.png", "text": "m"}),
        json.dumps({"text": "no file name"}),
        json.dumps({"file_name": "../outside.png", "text": "o"}),
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("line,needle", [(2, "malformed JSON"), (3, "truncated.png"), (4, "corrupt.png"),
                                         (5, "caption"), (6, "missing.png"), (7, "file_name"), (8, "outside")])
def test_bad_rows_raise_naming_file_and_line(tmp_path, line, needle):
    root = _bad_folder(tmp_path)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    (root / "metadata.jsonl").write_text("\n".join([lines[0], lines[line - 1]]) + "\n")
    with pytest.raises(DatasetError) as err:
        open_dataset(root)
    message = str(err.value)
    assert "metadata.jsonl (line 2)" in message and needle in message


def test_skip_bad_records_every_skipped_file(tmp_path):
    ds = open_dataset(_bad_folder(tmp_path), skip_bad=True)
    assert [s.relpath for s in ds] == ["g0.png"]
    assert sorted(s.line for s in ds.skipped) == [2, 3, 4, 5, 6, 7, 8]
    reasons = " | ".join(str(s) for s in ds.skipped)
    for needle in ("malformed JSON", "truncated.png", "corrupt.png", "missing.png", "outside"):
        assert needle in reasons
    note = skipped_note(ds).splitlines()
    assert note[0] == "skipped 7 bad sample(s):" and note[1:] == [f"  {printable(s)}" for s in ds.skipped]
    assert skipped_note(type(ds)(ds.root, ds.format, ds.samples)) is None  # nothing skipped, nothing to say


def test_kohya_folders_captions_fallback_and_repeats(tmp_path):
    root = tmp_path / "kohya"
    (root / "10_sks dog").mkdir(parents=True)
    (root / "3_style").mkdir()
    (root / "notes").mkdir()  # not an N_name folder: ignored
    Image.fromarray(_rgb(20)).save(root / "10_sks dog" / "a.png")
    (root / "10_sks dog" / "a.txt").write_text("a photo of sks dog\n")
    Image.fromarray(_rgb(21)).save(root / "10_sks dog" / "b.jpg")
    (root / "10_sks dog" / "b.caption").write_text("caption file wins")
    (root / "10_sks dog" / "b.txt").write_text("not used")
    Image.fromarray(_rgb(22)).save(root / "3_style" / "c.png")  # no caption file: folder name
    ds = open_dataset(root)
    assert ds.format == "kohya"
    got = {s.relpath: (s.caption, s.repeats, s.group) for s in ds}
    assert got == {
        "10_sks dog/a.png": ("a photo of sks dog", 10, "10_sks dog"),
        "10_sks dog/b.jpg": ("caption file wins", 10, "10_sks dog"),
        "3_style/c.png": ("style", 3, "3_style"),
    }
    ds_txt = open_dataset(root, caption_extension=".txt")
    assert {s.relpath: s.caption for s in ds_txt}["10_sks dog/b.jpg"] == "not used"


def test_kohya_missing_caption_without_folder_name_is_an_error(tmp_path):
    root = tmp_path / "k"
    (root / "5_").mkdir(parents=True)
    Image.fromarray(_rgb(1)).save(root / "5_" / "x.png")
    with pytest.raises(DatasetError, match=r"x\.png.*no caption"):
        open_dataset(root, format="kohya")


def test_unknown_layout_and_subset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither an imagefolder"):
        open_dataset(tmp_path / "empty")
    images = {"a.png": Image.fromarray(_rgb(1))}
    ds = open_dataset(_imagefolder(tmp_path / "d", [{"file_name": "a.png", "text": "x"}], images))
    with pytest.raises(DatasetError, match="not in the dataset"):
        ds.subset(["nope"])
    assert ds.subset(ds.keys).keys == ds.keys


def test_decode_error_names_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="x.png"):
        load_image(tmp_path / "x.png")


def test_sample_key_depends_on_bytes_and_caption():
    assert sample_key(b"abc", "x") != sample_key(b"abc", "y")
    assert sample_key(b"abc", "x") != sample_key(b"abd", "x")
    assert sample_key(b"abc", "x") == sample_key(b"abc", "x")


def test_json_errors_say_where_without_doubled_words(tmp_path):
    """json's messages such as "Unterminated string starting at" used to read "... at at column 52"."""
    images = {"a.png": Image.fromarray(_rgb(1))}
    root = _imagefolder(tmp_path / "d", [{"file_name": "a.png", "text": "x"}], images)
    for bad, where in (('{"file_name": "a.png", "text": "unterminated', "Invalid control character at column 45"),
                       ('{"file_name": "a.png" "text": "x"}', "delimiter at column 23")):
        (root / "metadata.jsonl").write_text(bad + "\n")
        with pytest.raises(DatasetError) as err:
            open_dataset(root)
        assert where in str(err.value) and "at at" not in str(err.value), str(err.value)
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads('{"text": "unterminated')
    assert json_error(err.value) == "Unterminated string starting at column 10"


def test_oversized_training_images_are_skipped_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from test_images import png_header

    images = {"a.png": Image.fromarray(_rgb(1))}
    root = _imagefolder(tmp_path / "d", [{"file_name": "a.png", "text": "x"}, {"file_name": "bomb.png", "text": "b"}],
                        images)
    (root / "bomb.png").write_bytes(png_header(22000, 22000))
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    ds = open_dataset(root, skip_bad=True)
    assert [s.relpath for s in ds] == ["a.png"] and (22000, 22000) not in decoded
    assert "bomb.png: image of" in str(ds.skipped[0]) and "megapixels" in str(ds.skipped[0])
