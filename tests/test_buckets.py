"""Aspect-ratio buckets as kohya trains with them, and a bucketed store featurizing each image in its bucket."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from das_sd.data.buckets import BucketSpec, default_buckets, kohya_buckets, resize_to_bucket

# the buckets at 512 px with kohya's defaults (256 to 1024 px, steps of 64), worked out by hand: for
# each width w, the largest multiple of 64 not above 512^2 / w (at most 1024), and the transposed pair
KOHYA_512 = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
             (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
             (320, 704), (256, 832), (256, 896), (256, 960)]


def test_the_buckets_at_512_are_kohyas():
    spec = BucketSpec(512, 256, 1024, 64)
    assert spec.sizes() == sorted(KOHYA_512)
    assert default_buckets(512, 64) == spec


def test_every_bucket_is_the_largest_of_its_width_within_the_area():
    spec = BucketSpec(768, 384, 1536, 64)
    def largest(w, h):  # h is the largest height that keeps w x h within the area and the bounds
        return w * (h + 64) > 768 * 768 or h + 64 > 1536

    for w, h in spec.sizes():
        assert w % 64 == h % 64 == 0 and 384 <= min(w, h) and max(w, h) <= 1536 and w * h <= 768 * 768
        assert largest(w, h) or largest(h, w)  # one of the pair was made from its width
        assert (h, w) in spec.sizes()


@pytest.mark.parametrize("size", [(1000, 1500), (1920, 1080), (500, 500), (300, 1200), (4000, 100)])
def test_an_image_goes_to_the_bucket_of_nearest_aspect_ratio(size):
    spec = BucketSpec(512, 256, 1024, 64)
    ratio = size[0] / size[1]
    best = min(abs(w / h - ratio) for w, h in KOHYA_512)
    bucket = spec.bucket_of(size)
    assert bucket in KOHYA_512 and abs(bucket[0] / bucket[1] - ratio) == best


def test_an_image_is_resized_to_cover_its_bucket_and_center_cropped():
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 50, 100))  # a red band on the far left: cropped away at 2:1
    out = resize_to_bucket(image, (128, 64))
    assert out.size == (128, 64) and out.getpixel((0, 32))[2] > 200  # blue at the left edge: centre kept
    same = Image.new("RGB", (128, 64))
    assert resize_to_bucket(same, (128, 64)) is same


def test_kohya_metadata_says_whether_and_how_it_bucketed():
    meta = {"ss_enable_bucket": "True", "ss_resolution": "(512, 512)", "ss_min_bucket_reso": "320",
            "ss_max_bucket_reso": "960", "ss_bucket_reso_steps": "64"}
    assert kohya_buckets(meta, 64) == BucketSpec(512, 320, 960, 64)
    assert kohya_buckets(dict(meta, ss_enable_bucket="False"), 64) is None
    assert kohya_buckets({}, 64) is None
    with pytest.raises(ValueError, match="multiples of step"):
        kohya_buckets(dict(meta, ss_min_bucket_reso="300"), 64)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, demo_data, base_path):
    """Three training images, wide, tall and square, and a kohya-style LoRA file saying it was
    trained with buckets (on the embedded model: 32 px, bucket step 8)."""
    from das_sd.data.datasets import open_dataset
    from das_sd.models.loading import load_lora, load_pipeline
    from helpers import random_lora

    root = tmp_path_factory.mktemp("buckets")
    lines = (demo_data / "metadata.jsonl").read_text().splitlines()[:3]
    (root / "data").mkdir()
    rows = []
    for (w, h), line in zip([(48, 24), (24, 48), (32, 32)], lines):
        record = json.loads(line)
        Image.open(demo_data / record["file_name"]).convert("RGB").resize((w, h)).save(root / "data" / f"{w}x{h}.png")
        rows.append(json.dumps({"file_name": f"{w}x{h}.png", "text": record["text"]}))
    (root / "data" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    pipe = load_pipeline(base_path, device="cpu")
    lora = root / "lora.safetensors"
    save_file(random_lora(pipe, rank=2), str(lora), metadata={
        "ss_enable_bucket": "True", "ss_resolution": "(32, 32)", "ss_min_bucket_reso": "16",
        "ss_max_bucket_reso": "64", "ss_bucket_reso_steps": "8"})
    load_lora(pipe, lora)
    return root, pipe, open_dataset(root / "data"), lora


def test_a_bucketed_store_featurizes_each_image_in_its_bucket(bucketed, base_path):
    from das_sd.featurize.build import featurize_dataset
    from das_sd.featurize.featurizer import Featurizer
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.latents import encode_images, encode_prompts
    from tolerances import FLOAT32_FORWARD_RTOL, relative_error

    root, pipe, dataset, lora = bucketed
    settings = FeaturizerSettings(num_timesteps=2, projection_dim=32)
    store = featurize_dataset(pipe, dataset, root / "store", base_path, lora, {"das": settings}, progress=False)
    assert store.identity["buckets"] == {"resolution": 32, "min_reso": 16, "max_reso": 64, "step": 8}
    stored = dict(zip(store.keys(), store.load("features.das")))
    featurizer = Featurizer(pipe, settings)
    for sample, bucket in zip(dataset.samples, [(40, 24), (24, 40), (32, 32)]):
        x0 = encode_images(pipe, dataset, 32, samples=[sample], bucket=bucket)
        assert x0.shape[2:] == (bucket[1] // 4, bucket[0] // 4)
        cond = encode_prompts(pipe, [sample.caption])
        expected = featurizer.features(x0, cond, [sample.key])[0]
        assert relative_error(stored[sample.key], expected) < FLOAT32_FORWARD_RTOL, bucket
        if bucket != (32, 32):  # the square crop the store featurized before buckets is another row
            square = featurizer.features(encode_images(pipe, dataset, 32, samples=[sample]), cond, [sample.key])[0]
            assert relative_error(square, expected) > 100 * FLOAT32_FORWARD_RTOL
    off = featurize_dataset(pipe, dataset, root / "store-off", base_path, lora, {"das": settings}, progress=False,
                            buckets="off")
    assert off.identity["buckets"] is None


def test_a_bucketed_store_takes_queries_of_its_buckets(bucketed, base_path):
    from das_sd.attribute import Attributor, QueryError
    from das_sd.featurize.build import featurize_dataset
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.score import LambdaRule, build_index

    root, pipe, dataset, lora = bucketed
    store = featurize_dataset(pipe, dataset, root / "store-q", base_path, lora,
                              {"das": FeaturizerSettings(num_timesteps=2, projection_dim=32)}, progress=False)
    build_index(store, "das", LambdaRule())
    attributor = Attributor(store.root, device="cpu")
    assert (40, 24) in attributor.query_sizes and attributor.query_sizes[0] == (32, 32)
    wide = Image.new("RGB", (40, 24), (200, 30, 30))
    result = attributor.attribute_image(wide, prompt="a red circle", method="das", top_k=2)
    assert len(result.results) == 2
    with pytest.raises(QueryError, match="image is 40x40"):
        attributor.attribute_image(Image.new("RGB", (40, 40)), prompt="x", method="das", top_k=2)
    with pytest.raises(QueryError, match="square latents"):
        attributor.attribute_image(wide, prompt="x", method="latent-sim", top_k=2)
