"""The das-sd Gradio app (`gradio_app.py`, `das-sd app`): flags -> ``AppConfig`` -> ``Workbench`` -> UI."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from .values import AppConfig

__all__ = ["AppConfig", "AppError", "Query", "Workbench", "add_app_flags", "config_from_args", "demo_config", "launch_app", "launch_demo", "main"]


def __getattr__(name: str):
    # the engine loads torch and diffusers: only on first use, so `das-sd --help` stays fast
    if name in ("AppConfig", "AppError", "Query"):
        from . import values

        return getattr(values, name)
    if name == "Workbench":
        from .session import Workbench

        return Workbench
    raise AttributeError(f"module 'das_sd.app' has no attribute {name!r}")


def launch_app(config: AppConfig, host: str, port: int | None) -> None:
    """Serve the app (blocking); a clear error when the optional app dependencies are missing.

    Args:
        config: What to serve: the store, model, dataset and output folder.
        host: Address to listen on ("127.0.0.1": this machine only, "0.0.0.0": every interface).
        port: Port to listen on; None: 7860 or the next free one.

    Raises:
        ValueError: When gradio or pandas (the ``das-sd[app]`` extra) is not installed.
    """
    try:
        from .ui import launch
    except ImportError as exc:
        raise ValueError(f"the app needs gradio and pandas ({exc.name} is missing): "
                         "pip install 'das-sd[app]'") from None
    from .session import Workbench

    launch(Workbench(config), host=host, port=port)


def demo_config(paths: dict, device: str | None = None, **extra: Any) -> AppConfig:
    """The app's configuration for the demo paths ``prepare_demo`` returns (its store built on first use).

    Args:
        paths: ``prepare_demo``'s paths: "base", "lora", "data", "workdir" and optionally "store"
            (default: the family's store in ``workdir``, ``store`` or ``store-sdxl``) and "family".
        device: Torch device ("cpu", "cuda", "cuda:1", ...); None: cuda when available.
        **extra: Further ``AppConfig`` fields (``outdir``).

    Returns:
        An ``AppConfig`` with ``demo=True``.
    """
    from ..toy.demo import family_suffix
    from .values import AppConfig

    default_store = Path(paths["workdir"]) / f"store{family_suffix(paths.get('family', 'sd'))}"
    return AppConfig(store=Path(paths.get("store") or default_store), base=Path(paths["base"]),
                     lora=Path(paths["lora"]), data=Path(paths["data"]), device=device, demo=True, **extra)


def add_app_flags(p: argparse.ArgumentParser) -> None:
    """Add the app's command-line flags (--store, --base, --lora, --data, --device, --outdir, --host, --port).

    Args:
        p: The parser (``gradio_app.py``'s or the ``das-sd app`` subcommand's) to add them to.
    """
    p.add_argument("--store", default=None, help="feature store folder (default: the embedded demo's store)")
    p.add_argument("--base", default=None,
                   help="base model folder or checkpoint file (default: the one the store names)")
    p.add_argument("--lora", default=None, help="LoRA file or folder (default: the one the store names)")
    p.add_argument("--data", default=None, help="dataset to build / extend the store from (default: the store's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--outdir", default=None, help="where generated PNGs are saved "
                   "(default: $DAS_SD_HOME/outputs, i.e. ~/.cache/das-sd/outputs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")


def config_from_args(args: argparse.Namespace, progress: bool = True) -> AppConfig:
    """The app's configuration from parsed ``add_app_flags`` flags.

    Without --store, the embedded demo: its data and LoRA are prepared now (the LoRA trained if the
    shipped one does not match), its store on first use.

    Args:
        args: Parsed flags of ``add_app_flags``.
        progress: Show progress bars while the demo is prepared.

    Returns:
        The ``AppConfig``; paths given as flags are expanded and made absolute.
    """
    from .values import AppConfig

    extra = {"outdir": Path(args.outdir).expanduser()} if args.outdir else {}
    if args.store is None:
        from ..toy.demo import prepare_demo

        paths = prepare_demo(progress=progress, with_store=False)
        return demo_config(paths, args.device, **extra)
    as_path = lambda v: Path(v).expanduser().resolve() if v else None  # noqa: E731
    return AppConfig(store=as_path(args.store), base=as_path(args.base), lora=as_path(args.lora),
                     data=as_path(args.data), device=args.device, **extra)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``gradio_app.py``: parse the flags and serve the app.

    Args:
        argv: Command-line arguments without the program name; None: ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(prog="gradio_app.py", description="das-sd: generate and see which training images made it")
    add_app_flags(parser)
    args = parser.parse_args(argv)
    launch_app(config_from_args(args), args.host, args.port)


def launch_demo(workdir: str | Path | None, device: str | None, host: str, port: int | None,
                announce: Callable[[dict], None] | None = None, family: str = "sd") -> None:
    """Prepare the embedded demo, write its sample grid and example attribution, and serve the app on it.

    Args:
        workdir: demo folder (None: ``$DAS_SD_HOME/demo``).
        device: "cpu", "cuda", ... (None: CUDA when available).
        host: address to listen on.
        port: port (None: 7860 or the next free one).
        announce: called with the demo's paths (data, LoRA, store, samples ...) before the app starts.
        family: "sd": the demo on the embedded tiny SD; "sdxl": on the embedded tiny SDXL.
    """
    from ..toy.demo import prepare_demo
    from ..toy.demo_samples import show_demo

    paths = prepare_demo(workdir, family=family)
    paths |= show_demo(paths)
    if announce:
        announce(paths)
    launch_app(demo_config(paths, device), host, port)
