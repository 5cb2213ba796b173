"""Paths das-sd fingerprints or opens as a LoRA: a FIFO, a device or a folder where a file is expected is
refused at once, naming the path (never a hang on a FIFO, never an endless read of /dev/zero), and a
safetensors header length field larger than the file is refused without allocating it."""

from __future__ import annotations

import hashlib
import os
import signal
from contextlib import contextmanager

import pytest
import torch

from das_sd.cli import main
from das_sd.models.fingerprint import lora_fingerprint, model_fingerprint, tensors_sha256
from das_sd.models.loading import ModelError, resolve_lora_file
from das_sd.store import FeatureStore, Row

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


@contextmanager
def deadline(seconds: int = 20):
    """Fail instead of hanging: the old code blocked forever opening a FIFO."""
    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture()
def odd_paths(tmp_path):
    fifo = tmp_path / "lora_fifo.safetensors"
    os.mkfifo(fifo)
    huge = tmp_path / "lora_hugelen.safetensors"
    huge.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    return {"fifo": fifo, "huge": huge, "folder": folder}


@pytest.mark.parametrize("kind, found", [("fifo", "a FIFO"), ("device", "a character device"),
                                         ("folder", "a directory")])
def test_lora_fingerprint_refuses_what_is_not_a_regular_file(odd_paths, kind, found):
    path = "/dev/zero" if kind == "device" else odd_paths[kind]
    with deadline(), pytest.raises(ValueError) as err:
        lora_fingerprint(path)
    assert str(err.value).startswith(f"{path}: not a regular file ({found})")


@pytest.mark.parametrize("kind, found", [("fifo", "a FIFO"), ("device", "a character device")])
def test_resolve_lora_file_says_not_a_regular_file_not_not_found(odd_paths, kind, found):
    path = "/dev/zero" if kind == "device" else odd_paths[kind]
    with deadline(), pytest.raises(ModelError) as err:
        resolve_lora_file(path)
    assert str(err.value).startswith(f"{path}: not a regular file ({found})")
    assert "not found" not in str(err.value)


def test_resolve_lora_file_folder_ignores_a_fifo_named_safetensors(odd_paths, tmp_path):
    assert resolve_lora_file(tmp_path) == odd_paths["huge"]  # the one regular .safetensors file
    odd_paths["huge"].unlink()
    with deadline(), pytest.raises(ModelError, match="no LoRA weights"):
        resolve_lora_file(tmp_path)  # a FIFO and a folder named *.safetensors are not weights


def test_header_length_beyond_the_file_is_refused_without_allocating_it(odd_paths, tmp_path):
    with pytest.raises(ValueError) as err:
        lora_fingerprint(odd_paths["huge"])
    assert str(err.value).startswith(f"{odd_paths['huge']}: not a readable safetensors file")
    assert f"says {1 << 62} bytes" in str(err.value)
    big = tmp_path / "big.safetensors"
    big.write_bytes((200_000_000).to_bytes(8, "little"))
    with open(big, "r+b") as fh:
        fh.truncate(200_000_100)  # sparse: the length fits the file but not safetensors' 100 MB cap
    with pytest.raises(ValueError, match="safetensors' limit of 100000000"):
        tensors_sha256(big)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=f"{short}: not a readable safetensors file .*shorter than"):
        lora_fingerprint(short)


def test_model_fingerprint_hashes_a_checkpoint_file_and_refuses_a_fifo_or_device(odd_paths):
    for path, found in ((odd_paths["fifo"], "a FIFO"), ("/dev/zero", "a character device")):
        with deadline(), pytest.raises(ValueError, match=f"^{path}: not a regular file \\({found}\\)"):
            model_fingerprint(path)
    # a single-file checkpoint: the sha256 of its bytes (A1111's / Civitai's model hash)
    digest = hashlib.sha256(odd_paths["huge"].read_bytes()).hexdigest()
    assert model_fingerprint(odd_paths["huge"]) == f"sha256:{digest}"


@pytest.fixture()
def tiny_store(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    identity = {"base_fingerprint": model_fingerprint(base), "lora_fingerprint": "sha256:0",
                "resolution": 8, "feature_sets": {"das": {}}}
    store = FeatureStore.create(tmp_path / "store", identity, shard_size=4)
    store.append_shard([Row("k0", "a.png", "a")], {"features.das": torch.ones(1, 4),
                                                    "residuals.das": torch.ones(1)})
    return store, base


@pytest.mark.parametrize("kind, says", [("fifo", "not a regular file (a FIFO)"),
                                        ("huge", "not a readable safetensors file"),
                                        ("folder", "not a regular file (a directory)")])
def test_attribute_refuses_the_lora_path_naming_it(tiny_store, odd_paths, capsys, kind, says):
    store, base = tiny_store
    with deadline(60):
        code = main(["attribute", "--store", str(store.root), "--image", "x.png", "--prompt", "x",
                     "--base", str(base), "--lora", str(odd_paths[kind])])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"{odd_paths[kind]}: {says}" in err
