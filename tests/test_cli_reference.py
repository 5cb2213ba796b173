"""docs/cli.md is generated from the argument parsers (das_sd.cli_reference): it must match them, and
the rendering must not depend on the machine (terminal width, paths, devices, versions)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from das_sd import __version__, cli_reference
from das_sd.cli import build_parser

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(prog, parser) of das-sd and of every command and nested command."""
    found, todo = [], [("das-sd", build_parser())]
    while todo:
        prog, parser = todo.pop()
        found.append((prog, parser))
        todo += [(f"{prog} {name}", sub) for name, _, sub in cli_reference._subcommands(parser)]
    return found


def test_docs_cli_md_matches_the_parsers() -> None:
    rendered = cli_reference.render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    if current != rendered:
        old, new = current.splitlines(), rendered.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        pytest.fail(f"docs/cli.md is out of date with the das-sd parsers (first difference at line {first + 1}: "
                    f"{old[first] if first < len(old) else '<end>'!r} vs {new[first] if first < len(new) else '<end>'!r}); "
                    "run `make cli-docs` and commit docs/cli.md")


def test_the_rendering_does_not_depend_on_the_terminal_or_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    first = cli_reference.render()
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("DAS_SD_HOME", "/somewhere/else")
    assert cli_reference.render() == first
    for machine_path in (os.path.expanduser("~"), str(Path.cwd())):
        assert len(machine_path) < 2 or machine_path not in first, machine_path
    assert f"das-sd {__version__}" not in first  # a release would otherwise change the page


def test_every_command_is_on_the_page_in_a_group() -> None:
    page = cli_reference.render()
    for prog, _ in _all_parsers():
        assert f"`{prog}`" in page, prog
    saved = cli_reference.GROUPS
    try:
        cli_reference.GROUPS = tuple((t, b, tuple(n for n in names if n != "index")) for t, b, names in saved)
        with pytest.raises(ValueError, match="index"):
            cli_reference.render()
    finally:
        cli_reference.GROUPS = saved


def test_every_option_has_help_and_a_plain_default() -> None:
    """Each flag says what it does, and its default is a literal: a default computed at run time (the
    device, free memory, a path under the home folder) would make the page differ between machines;
    such a default is None in the parser and the help text says what it becomes."""
    problems = []
    for prog, parser in _all_parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{prog} {max(action.option_strings, key=len) if action.option_strings else action.dest}"
            if not action.help and not isinstance(action, argparse._VersionAction):
                problems.append(f"{name}: no help text")
            default = action.default
            values = default if isinstance(default, (list, tuple)) else [default]
            if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
                problems.append(f"{name}: default {default!r} is not a plain literal")
            if isinstance(default, str) and (os.path.isabs(default) or default.startswith("~")):
                problems.append(f"{name}: default {default!r} is a path of this machine")
    assert not problems, "\n".join(problems)


def test_out_writes_the_page_atomically(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    out.write_text("stale")
    assert cli_reference.main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == cli_reference.render()
    assert [p.name for p in tmp_path.iterdir()] == ["cli.md"]


def _defaults(argv: list[str]) -> dict:
    """The parsed defaults of one command (``argv``: the command and its required flags)."""
    return vars(build_parser().parse_args(argv))


def test_the_flags_defaults_are_the_settings_defaults() -> None:
    """Where a flag's default repeats a settings dataclass's (the library's defaults), they agree, so
    the page, ``--help`` and the API document one value."""
    from das_sd.evaluate.counterfactual import CounterfactualSettings
    from das_sd.evaluate.lds_settings import LDSSettings
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.generation import GenerationSettings
    from das_sd.inspect.inspection import InspectSettings
    from das_sd.toy.build_base import BaseRecipe
    from das_sd.lora_record import LoraRecipe

    train = _defaults(["train-lora", "--data", "d", "--out", "o"])
    recipe = LoraRecipe()
    assert (train["rank"], train["steps"], train["lr"], train["batch_size"], train["seed"]) == \
        (recipe.rank, recipe.steps, recipe.learning_rate, recipe.batch_size, recipe.seed)
    assert train["text_encoder_rank"] is None and "default 8" in _help("train-lora", "--text-encoder-rank")
    assert recipe.text_encoder_rank == 8

    gen = _defaults(["generate", "--prompt", "p", "--out", "o"])
    settings = GenerationSettings(prompt="p")
    for flag in ("negative_prompt", "seed", "steps", "guidance", "num_images", "lora_scale"):
        assert gen[flag] == getattr(settings, flag), flag

    feat = _defaults(["featurize", "--data", "d", "--store", "s"])
    fs = FeaturizerSettings()
    assert (feat["output"], feat["timesteps"], feat["dim"], feat["projector"], feat["projection_nonzeros"],
            feat["projection_seed"], feat["noise_seed"], feat["residual"], feat["residual_timesteps"]) == \
        (fs.output, fs.num_timesteps, fs.projection_dim, fs.projector, fs.projection_nonzeros,
         fs.projection_seed, fs.noise_seed, fs.residual, fs.residual_timesteps)

    ins = _defaults(["inspect", "--store", "s", "--out", "o"])
    inspect_settings = InspectSettings()
    for flag in ("method", "top_k", "batch_size", "bootstrap", "duplicate_threshold"):
        assert ins[flag] == getattr(inspect_settings, flag), flag

    lds = _defaults(["eval", "lds", "--store", "s", "--workdir", "w"])
    for flag in ("subsets", "repeats", "tune_fraction", "output_timesteps", "output_noise_draws"):
        assert lds[flag] == getattr(LDSSettings, flag), flag
    assert lds["rho_grid"] is None
    assert ",".join(f"{r:g}" for r in LDSSettings.rho_grid) in _help("eval lds", "--rho-grid")

    cf = _defaults(["eval", "counterfactual", "--store", "s", "--workdir", "w", "--prompts", "p"])
    assert (cf["top_k"], cf["random_draws"]) == (CounterfactualSettings.top_k, CounterfactualSettings.random_draws)

    assert _defaults(["build-base", "--out", "o"])["seed"] == BaseRecipe.seed


def _help(command: str, flag: str) -> str:
    """The help text of one flag of ``das-sd COMMAND``."""
    parsers = dict(_all_parsers())
    action = next(a for a in parsers[f"das-sd {command}"]._actions if flag in a.option_strings)
    return action.help or ""


def test_help_texts_quote_the_defaults_they_depend_on() -> None:
    """Defaults quoted in help prose (not in the parser's default) match the code."""
    from das_sd.registry import DEFAULT_METHOD, DEFAULT_RHO

    assert _defaults(["index", "--store", "s"])["rho"] == DEFAULT_RHO
    assert "rho * trace(Phi^T Phi) / min(N, k)" in _help("index", "--rho")
    assert _defaults(["attribute", "--store", "s", "--image", "i"])["method"] == DEFAULT_METHOD
    assert "(default 8; 0: UNet only)" in _help("train-lora", "--text-encoder-rank")
