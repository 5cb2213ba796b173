"""The das-sd command line, run in-process (and once through the installed console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from das_sd.cli import main
from das_sd.png_metadata import read_png_metadata
from helpers import TINY_FEATURIZE, subset_dataset


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_installed():
    exe = shutil.which("das-sd") or str(Path(sys.executable).parent / "das-sd")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("das-sd ")


def test_make_demo_data_and_check_data(capsys, tmp_path):
    code, out, _ = run(capsys, "make-demo-data", str(tmp_path / "d"))
    assert code == 0 and out.strip() == str(tmp_path / "d")
    code, out, _ = run(capsys, "check-data", "--data", str(tmp_path / "d"))
    info = json.loads(out)
    assert code == 0 and info["samples"] == 264 and info["format"] == "imagefolder" and info["skipped"] == []
    code, _, err = run(capsys, "make-demo-data", str(tmp_path / "d"))
    assert code == 2 and "--overwrite" in err


def test_bad_data_fails_with_file_and_line_or_is_skipped(capsys, tmp_path, demo_data):
    root = tmp_path / "bad"
    shutil.copytree(demo_data, root)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    lines.insert(3, "{broken")
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "check-data", "--data", str(root))
    assert code == 2 and "metadata.jsonl (line 4)" in err and "malformed JSON" in err
    code, out, err = run(capsys, "check-data", "--data", str(root), "--skip-bad")
    assert code == 0 and json.loads(out)["samples"] == 264 and "skipped 1 bad sample" in err


def test_generate_with_lora_writes_provenance(capsys, tmp_path, demo_data):
    from das_sd.models.loading import embedded_demo_lora_path

    lora = embedded_demo_lora_path() / "pytorch_lora_weights.safetensors"
    code, out, _ = run(capsys, "generate", "--prompt", "a red square on a white background, striped style",
                       "--seed", "5", "--steps", "10", "--num-images", "2", "--lora", str(lora),
                       "--device", "cpu", "--out", str(tmp_path / "img.png"))
    paths = out.split()
    assert code == 0 and [p.rsplit("/", 1)[-1] for p in paths] == ["img-00.png", "img-01.png"]
    meta = read_png_metadata(paths[1])
    assert meta["seed"] == 6 and meta["steps"] == 10 and meta["lora_name"] == "demo-lora"
    assert meta["lora_fingerprint"].startswith("sha256:") and meta["base_fingerprint"].startswith("sha256:")


def test_train_lora_on_a_subset_and_export(capsys, tmp_path, demo_data):
    from das_sd.data.datasets import open_dataset

    keys = open_dataset(demo_data).keys[::50]
    (tmp_path / "subset.txt").write_text("\n".join(keys))
    code, out, _ = run(capsys, "train-lora", "--data", str(demo_data), "--out", str(tmp_path / "lora"),
                       "--subset", str(tmp_path / "subset.txt"), "--steps", "3", "--batch-size", "4", "--rank", "2")
    assert code == 0 and json.loads(out)["samples"] == len(keys)
    record = json.loads((tmp_path / "lora" / "lora_record.json").read_text())
    assert record["sample_keys"] == keys and record["recipe"]["rank"] == 2
    assert record["recipe"]["alpha"] == 2.0 and record["recipe"]["text_encoder_rank"] == 8  # the flags' defaults

    code, out, _ = run(capsys, "export-lora", "--lora", str(tmp_path / "lora"), "--to", "kohya",
                       "--out", str(tmp_path / "kohya.safetensors"))
    state = load_file(str(tmp_path / "kohya.safetensors"))
    assert code == 0 and all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in state)  # the text-encoder LoRA too
    assert sum(k.endswith(".alpha") for k in state) * 3 == len(state)


@pytest.mark.parametrize("argv,needle", [
    (["train-lora", "--data", "/nonexistent/data", "--out", "x"], "/nonexistent/data"),
    (["generate", "--prompt", "x", "--base", "/nonexistent/base", "--out", "x.png"], "/nonexistent/base"),
    (["generate", "--prompt", "x", "--lora", "/nonexistent/l.safetensors", "--out", "x.png"], "not found"),
    (["featurize", "--data", "/nonexistent/data", "--lora", "x", "--store", "/nonexistent/store", "--autocast", "fp16",
      "--device", "cpu"], "--autocast fp16"),
])
def test_bad_paths_are_named(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err


def test_demo_no_launch_prints_paths(capsys):
    # the default workdir ($DAS_SD_HOME/demo) is shared with the attribution tests' demo store
    code, out, _ = run(capsys, "demo", "--no-launch")
    paths = json.loads(out)
    assert code == 0
    for key in ("base", "lora", "data", "ground_truth", "store"):
        assert Path(paths[key]).exists(), key
    assert list(Path(paths["store"]).glob("index-das-*-00000.safetensors"))


@pytest.mark.parametrize("argv, flag", [
    (["attribute", "--store", "S", "--image", "x.png", "--top-k", "-5"], "--top-k"),
    (["attribute", "--store", "S", "--image", "x.png", "--top-k", "0"], "--top-k"),
    (["inspect", "--store", "S", "--out", "o", "--top-k", "0"], "--top-k"),
    (["inspect", "--store", "S", "--out", "o", "--seeds", "-1"], "--seeds"),
    (["inspect", "--store", "S", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["eval", "counterfactual", "--store", "S", "--prompts", "p.txt", "--top-k", "0"], "--top-k"),
    (["eval", "lds", "--store", "S", "--workdir", "w", "--subsets", "0"], "--subsets"),
    (["eval", "lds", "--store", "S", "--workdir", "w", "--rho-grid", "1,x"], "--rho-grid"),
    (["eval", "lds", "--store", "S", "--workdir", "w", "--rho-grid", "1,0"], "--rho-grid"),
    (["eval", "ablations", "--store", "S", "--workdir", "w", "--rho-grid", ","], "--rho-grid"),
    (["featurize", "--lora", "l", "--data", "d", "--store", "S", "--dim", "0"], "--dim"),
    (["featurize", "--lora", "l", "--data", "d", "--store", "S", "--timesteps", "-2"], "--timesteps"),
    (["featurize", "--lora", "l", "--data", "d", "--store", "S", "--shard-size", "0"], "--shard-size"),
    (["featurize", "--lora", "l", "--data", "d", "--store", "S", "--batch-size", "0"], "--batch-size"),
    (["generate", "--prompt", "p", "--out", "o.png", "--num-images", "0"], "--num-images"),
    (["train-lora", "--data", "d", "--out", "o", "--steps", "0"], "--steps"),
    (["train-lora", "--data", "d", "--out", "o", "--text-encoder-rank", "-1"], "--text-encoder-rank"),
    (["index", "--store", "S", "--rho", "nan"], "--rho"),
])
def test_counts_and_sizes_must_be_positive_at_parse_time(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and f"argument {flag}: " in err and "Traceback" not in err
    assert "positive" in err or "negative" in err


def test_demo_announces_its_paths_then_serves_the_app_on_them(capsys, monkeypatch, tmp_path):
    import das_sd.app
    import das_sd.toy.demo
    import das_sd.toy.demo_samples

    paths = {k: str(tmp_path / k) for k in ("workdir", "base", "lora", "data", "store")}
    served = []
    monkeypatch.setattr(das_sd.toy.demo, "prepare_demo", lambda workdir, **kw: dict(paths, workdir=str(workdir)))
    monkeypatch.setattr(das_sd.toy.demo_samples, "show_demo", lambda p: {"samples": f"{p['workdir']}/grid.png"})
    monkeypatch.setattr(das_sd.app, "launch_app", lambda config, host, port: served.append((config, host, port)))
    code, out, _ = run(capsys, "demo", "--workdir", str(tmp_path / "w"), "--device", "cpu", "--port", "7999")
    printed = json.loads(out)
    assert code == 0 and printed["samples"] == f"{tmp_path / 'w'}/grid.png" and printed["store"] == paths["store"]
    [(config, host, port)] = served
    assert (config.store, config.lora, config.device, config.demo) == (Path(paths["store"]), Path(paths["lora"]), "cpu", True)
    assert (host, port) == ("127.0.0.1", 7999)


def test_text_encoder_rank_zero_still_parses():
    from das_sd.cli import build_parser

    args = build_parser().parse_args(["train-lora", "--data", "d", "--out", "o", "--text-encoder-rank", "0"])
    assert args.text_encoder_rank == 0


FEATURIZE = ["featurize", "--lora", "l", "--data", "d", "--store", "S"]


@pytest.mark.parametrize("modes", [["--shard", "0/2", "--merge"], ["--merge", "--ray"], ["--shard", "1/2", "--ray", "addr"]])
def test_featurize_modes_exclude_each_other_at_parse_time(capsys, modes):
    with pytest.raises(SystemExit) as exc:
        main(FEATURIZE + modes)
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and "not allowed with argument" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory, demo_data):
    """A 4-image dataset and a store featurized as parts 0/2 and 1/2 (not merged yet)."""
    from das_sd.models.loading import embedded_demo_lora_path

    root = tmp_path_factory.mktemp("parts")
    data = subset_dataset(demo_data, root / "data", 4)
    lora = embedded_demo_lora_path()
    for part in ("0/2", "1/2"):
        assert main(["featurize", "--data", str(data), "--lora", str(lora), "--store", str(root / "store"),
                     "--device", "cpu", "--shard", part, *TINY_FEATURIZE]) == 0
    return data, root / "store"


def test_merge_needs_no_lora_and_lora_is_required_otherwise(capsys, tiny_parts):
    data, store = tiny_parts
    capsys.readouterr()
    code, _, err = run(capsys, "featurize", "--data", str(data), "--store", str(store), "--device", "cpu")
    assert code == 2 and "--lora is required" in err and "Traceback" not in err
    assert (store / "parts").is_dir()  # refused before anything was done
    code, out, err = run(capsys, "featurize", "--data", str(data), "--store", str(store), "--merge")
    info = json.loads(out)
    assert code == 0, err
    assert info["samples"] == 4 and info["shards"] == 2 and info["complete"] is True and not (store / "parts").exists()


def test_an_arithmetic_error_of_the_scorer_is_one_line_not_a_traceback(capsys, monkeypatch, tiny_parts):
    import das_sd.score

    _, store = tiny_parts
    if (store / "parts").exists():  # this test alone: merge first
        assert main(["featurize", "--data", str(tiny_parts[0]), "--store", str(store), "--merge"]) == 0

    def broken(*_args, **_kwargs):
        raise ArithmeticError("leverage outside [0, 1): [-0.5, 1.2]")

    monkeypatch.setattr(das_sd.score, "index_arrays", broken)
    capsys.readouterr()
    code, out, err = run(capsys, "index", "--store", str(store))
    assert code == 2 and out == ""
    assert err == "das-sd index: error: leverage outside [0, 1): [-0.5, 1.2]\n"


def test_an_os_error_is_one_line_not_a_traceback(capsys, tmp_path):
    from das_sd.models.loading import embedded_demo_lora_path

    (tmp_path / "file").write_text("not a folder")
    code, _, err = run(capsys, "export-lora", "--lora", str(embedded_demo_lora_path()),
                       "--out", str(tmp_path / "file" / "x.safetensors"))
    assert code == 2 and err.startswith("das-sd export-lora: error: ") and str(tmp_path / "file") in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_ray_hands_the_job_to_the_workers_without_loading_a_pipeline(capsys, monkeypatch, tmp_path, demo_data):
    import das_sd.featurize.parallel
    import das_sd.models.loading
    from das_sd.models.loading import embedded_base_path, embedded_demo_lora_path

    def no_pipeline(*_args, **_kwargs):
        raise AssertionError("the CLI process loaded a pipeline")

    handed = {}

    class MergedStore(list):  # what the merge returns, as much as the CLI prints of it
        manifest = {"shards": [], "complete": True, "info": {}}

    def fake_ray(address, workers, job, progress=True):
        handed.update(address=address, workers=workers, job=job)
        store = MergedStore()
        store.root = Path(job.store)
        return store

    monkeypatch.setattr(das_sd.models.loading, "load_pipeline", no_pipeline)
    monkeypatch.setattr(das_sd.featurize.parallel, "featurize_on_ray", fake_ray)
    code, out, err = run(capsys, "featurize", "--data", str(demo_data), "--lora", str(embedded_demo_lora_path()),
                         "--store", str(tmp_path / "store"), "--ray", "--ray-workers", "3", "--feature-sets", "das")
    assert code == 0, err
    job = handed["job"]
    assert handed["address"] is None and handed["workers"] == 3 and json.loads(out)["store"] == str(tmp_path / "store")
    assert job.base == embedded_base_path() and job.lora == embedded_demo_lora_path() / "pytorch_lora_weights.safetensors"
    assert list(job.feature_sets()) == ["das"] and job.data == demo_data.resolve()


def test_commands_are_thin():
    """Each command parses its flags, calls the library once and prints: the logic lives in das_sd."""
    import inspect

    from source_metrics import code_lines

    import das_sd.cli
    import das_sd.evaluate.cli
    import das_sd.inspect.cli
    import das_sd.store_cli
    import das_sd.toy.cli

    modules = (das_sd.cli, das_sd.store_cli, das_sd.evaluate.cli, das_sd.inspect.cli, das_sd.toy.cli)
    commands = {name: f for m in modules for name, f in vars(m).items() if name.startswith("cmd_")}
    sizes = {name: code_lines(inspect.getsource(f)) for name, f in commands.items()}
    assert len(commands) >= 17 and max(sizes.values()) <= 16, sizes
    assert max(code_lines(inspect.getsource(m)) for m in modules) < 400

def test_featurize_memory_budget_is_parsed_or_refused_at_parse_time(capsys):
    from das_sd.cli import build_parser

    args = build_parser().parse_args([*FEATURIZE, "--max-memory", "24GB", "--allow-partial"])
    assert args.max_memory == 24 << 30 and args.allow_partial is True
    with pytest.raises(SystemExit) as exc:
        main([*FEATURIZE, "--max-memory", "lots"])
    assert exc.value.code == 2 and "argument --max-memory: 'lots' is not a memory size" in capsys.readouterr().err


def test_library_warnings_stay_off_stderr(demo, tmp_path):
    """A newcomer reads any stderr line as an error: `das-sd --help` and `das-sd attribute` (which
    imports diffusers, whose import made transformers warn about torchvision) print none of theirs."""
    from das_sd.attribute import Attributor
    from das_sd.generation import GenerationSettings, generate
    from das_sd.png_metadata import save_png

    pipe = Attributor(demo["store"], device="cpu").pipe
    result = generate(pipe, GenerationSettings(prompt="zorblat, a green square on a orange background", steps=4))
    png = save_png(result.images[0], tmp_path / "q.png", result.metadata(0))
    cli = [sys.executable, "-m", "das_sd.cli"]
    for argv in (["--help"], ["attribute", "--store", demo["store"], "--image", str(png), "--device", "cpu"]):
        done = subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "torchvision" not in done.stderr and "[transformers]" not in done.stderr, done.stderr
        assert done.stderr.strip() == "", done.stderr  # das-sd itself has nothing to say here either
    assert "share" in done.stdout and "%" in done.stdout  # the attribution table leads with the shares


def test_a_torchvision_fallback_warning_is_dropped_and_no_other():
    import logging

    import das_sd  # noqa: F401  (attaches the filter)
    from das_sd.quiet import TORCHVISION_FALLBACK_LOGGER

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, keep = logging.getLogger(TORCHVISION_FALLBACK_LOGGER), Keep()
    logger.addHandler(keep)  # on the logger itself: transformers' root logger does not propagate
    level = logger.level
    logger.setLevel(logging.WARNING)  # das-sd's quiet_libraries sets transformers to errors only
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                       "`CLIPImageProcessorPil` for backward compatibility.")
        logger.warning("`AutoModel` requires torchvision for this checkpoint")
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert keep.messages == ["`AutoModel` requires torchvision for this checkpoint"]
