"""das_sd.registry: torch-free, clear errors, and every face (CLI, app, plugins) offering its lists."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from das_sd.registry import (AUTOCAST_DTYPES, DEFAULT_AUTOCAST, DEFAULT_INDEX_DTYPE, DEFAULT_METHOD, DEFAULT_RHO,
                             GRADIENT_METHOD_NAMES, INDEX_DTYPES, METHOD_NAMES, METHODS, OUTPUT_FUNCTIONS,
                             PROJECTOR_KINDS, RESIDUAL_FORMS, check_choice, method)

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = ROOT / "extensions"


def run_python(code: str) -> dict:
    """The JSON that ``code`` prints last, run in a fresh interpreter on this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "diffusers", "transformers", "safetensors")


def test_importing_the_registry_loads_no_torch():
    loaded = run_python("import json, sys\nimport das_sd.registry\n"
                        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert loaded == []


def test_the_comfyui_nodes_offer_the_registry_methods_without_loading_torch():
    report = run_python(
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('das_nodes', {str(EXTENSIONS / 'comfyui-das-sd' / 'nodes.py')!r})\n"
        "nodes = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(nodes)\n"
        "print(json.dumps({'methods': nodes.DASAttribute.INPUT_TYPES()['required']['method'][0],\n"
        f"                  'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    assert report == {"methods": list(METHOD_NAMES), "loaded": []}


def test_the_webui_extension_offers_the_registry_methods_without_loading_torch():
    """The script's dropdown and its Settings option, built by the webui stand-in (tests/hosts)."""
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "hosts" / "build_webui_ui.py")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["methods"] == report["settings_methods"] == list(METHOD_NAMES)
    assert report["method_default"] == report["settings_method_default"] == DEFAULT_METHOD
    assert report["torch_loaded"] is False


def test_the_invokeai_node_offers_the_registry_methods(monkeypatch):
    """The node module under a stand-in of invokeai.invocation_api (decorators and fields as plain values)."""
    api = types.ModuleType("invokeai.invocation_api")
    for name in ("BaseInvocation", "BaseInvocationOutput", "WithBoard", "ImageField", "InvocationContext",
                 "MetadataField"):
        setattr(api, name, type(name, (), {}))
    api.InputField = lambda default=None, **_: default
    api.OutputField = lambda **_: None
    api.invocation = api.invocation_output = lambda *_, **__: (lambda cls: cls)
    monkeypatch.setitem(sys.modules, "invokeai", types.ModuleType("invokeai"))
    monkeypatch.setitem(sys.modules, "invokeai.invocation_api", api)
    spec = importlib.util.spec_from_file_location("das_invokeai_node", EXTENSIONS / "invokeai-das-sd" / "das_attribution.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    field = node.DASAttributionInvocation.__annotations__["method"]
    assert typing.get_origin(field) is typing.Literal and typing.get_args(field) == METHOD_NAMES
    assert node.DASAttributionInvocation.method == DEFAULT_METHOD


def test_the_app_dropdown_offers_the_registry_methods(tmp_path):
    import gradio as gr

    from das_sd.app.session import AppConfig, Workbench
    from das_sd.app.ui import build_app

    app = build_app(Workbench(AppConfig(store=tmp_path / "no-store-yet")))
    [dropdown] = [b for b in app.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Attribution method"]
    assert [value for _, value in dropdown.choices] == list(METHOD_NAMES)
    assert dropdown.value == DEFAULT_METHOD


def _command(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def _flag(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_the_cli_offers_the_registry_choices_and_defaults():
    from das_sd.cli import build_parser
    from das_sd.score import LambdaRule

    parser = build_parser()
    attribute, inspect = _flag(_command(parser, "attribute"), "--method"), _flag(_command(parser, "inspect"), "--method")
    assert tuple(attribute.choices) == METHOD_NAMES and attribute.default == DEFAULT_METHOD
    assert tuple(inspect.choices) == GRADIENT_METHOD_NAMES and inspect.default == DEFAULT_METHOD
    featurize = _command(parser, "featurize")
    for flag, choices in (("--output", OUTPUT_FUNCTIONS), ("--projector", PROJECTOR_KINDS),
                          ("--residual", RESIDUAL_FORMS), ("--autocast", tuple(AUTOCAST_DTYPES))):
        assert tuple(_flag(featurize, flag).choices) == choices, flag
    assert _flag(featurize, "--autocast").default == DEFAULT_AUTOCAST
    index = _command(parser, "index")
    assert tuple(_flag(index, "--dtype").choices) == INDEX_DTYPES and _flag(index, "--dtype").default == DEFAULT_INDEX_DTYPE
    assert _flag(index, "--rho").default == DEFAULT_RHO == LambdaRule().rho


def test_eval_methods_are_checked_while_the_flags_are_parsed(capsys):
    from das_sd.cli import build_parser

    args = build_parser().parse_args(["eval", "groundtruth", "--store", "s", "--methods", "das, tracin"])
    assert args.methods == ["das", "tracin"]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["eval", "groundtruth", "--store", "s", "--methods", "das,nope"])
    assert exit_.value.code == 2
    assert "--methods: 'das,nope': unknown nope; expected some of das, das-signed" in capsys.readouterr().err


def test_every_method_uses_a_feature_set_the_featurizer_builds():
    from das_sd.featurize.build import default_feature_sets

    sets = default_feature_sets()
    assert {m.feature_set for m in METHODS.values()} - {None} == set(sets)
    assert GRADIENT_METHOD_NAMES == tuple(n for n in METHOD_NAMES if n != "latent-sim")
    assert all(s.output in OUTPUT_FUNCTIONS and s.residual in RESIDUAL_FORMS and s.projector in PROJECTOR_KINDS
               for s in sets.values())


def test_method_and_check_choice_errors_name_the_choices():
    assert method("das-signed").name == "das-signed" and not method("das-signed").squared
    for bad in ("nope", "", None, ["das"]):
        with pytest.raises(ValueError, match=re.escape(f"unknown method {bad!r}; expected one of "
                                                       + ", ".join(METHOD_NAMES))):
            method(bad)
    check_choice("--dtype", "float16", INDEX_DTYPES)  # a valid value passes
    with pytest.raises(ValueError, match=re.escape("--dtype 'float64': expected one of float32, float16, int8")):
        check_choice("--dtype", "float64", INDEX_DTYPES)
    with pytest.raises(ValueError, match=re.escape("method 3: expected one of a, b")):
        check_choice("method", 3, iter(["a", "b"]))


def test_settings_dataclasses_validate_against_the_registry():
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.inspect import InspectSettings
    from das_sd.projection import ProjectorSpec

    with pytest.raises(ValueError, match=re.escape("projector kind 'countsketch': expected one of sparse, rademacher, gaussian")):
        FeaturizerSettings(projector="countsketch")
    with pytest.raises(ValueError, match=re.escape("projector kind 'dense': expected one of sparse")):
        ProjectorSpec(kind="dense")
    with pytest.raises(ValueError, match=re.escape("output function 'max': expected one of mean, l1, square, loss")):
        FeaturizerSettings(output="max")
    with pytest.raises(ValueError, match=re.escape("residual form 'abs': expected one of scale-free, magnitude, none")):
        FeaturizerSettings(residual="abs")
    with pytest.raises(ValueError, match=re.escape("method 'nope': expected one of das, das-signed")):
        InspectSettings(method="nope")
    assert InspectSettings().method == DEFAULT_METHOD


def test_the_feature_sets_are_those_the_featurizer_builds_and_the_cli_offers():
    from das_sd.cli import build_parser
    from das_sd.featurize.build import default_feature_sets
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.registry import FEATURE_SETS

    assert tuple(default_feature_sets(FeaturizerSettings())) == FEATURE_SETS == ("das", "dtrak", "trak")
    args = build_parser().parse_args(["featurize", "--lora", "l", "--data", "d", "--store", "s"])
    assert args.feature_sets == FEATURE_SETS


def test_the_featurizer_settings_default_to_the_projectors_own_defaults():
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.projection import ProjectorSpec

    assert FeaturizerSettings().projector_spec() == ProjectorSpec()
