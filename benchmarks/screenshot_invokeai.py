"""docs/host-invokeai.png: the DAS Attribution node's result in a real InvokeAI web UI.

Starts `invokeai-web` (the python in DAS_SD_INVOKEAI_PYTHON, a venv with invokeai==6.14.2 and das-sd;
`make screenshots-invokeai` names build/host-invokeai-6.14.2) in a temporary root with the node pack,
runs the node on a demo generation exactly as tests/hosts/test_invokeai_node.py does (its helpers are
in tests/hosts/invokeai_server.py), into a board "das-sd attribution", then opens the UI in headless
Chromium, selects that board (oldest first: rank 1 first), opens the rank-1 training image in the
viewer with its metadata (the node's `das_sd` entry: rank, caption, share, score) and screenshots it.

The server runs with INVOKEAI_HTTP_COMPRESSION_LEVEL=0: with compression on, InvokeAI 6.14.2's gzip
middleware (on starlette 1.10) answers the UI's socket.io polling requests with HTTP 500 and the UI
shows "Disconnected"; the API calls and the gallery are the same either way.

Usage: DAS_SD_INVOKEAI_PYTHON=build/host-invokeai-6.14.2/bin/python python benchmarks/screenshot_invokeai.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "hosts"), str(ROOT / "tests")]

from helpers import browser_page  # noqa: E402  (tests/helpers.py)
from invokeai_server import PROMPT, SEED, TOP_K, invokeai_server, run_node, upload_generation  # noqa: E402
from screenshots import demo_generation, optimize_png  # noqa: E402  (benchmarks/screenshots.py)

BOARD = "das-sd attribution"
OUT = ROOT / "docs" / "host-invokeai.png"


def capture_ui(url: str, image_names: list[str], out: Path, width: int = 1400, height: int = 900,
               timeout_ms: int = 120_000) -> None:
    """Screenshot the InvokeAI UI with the board BOARD selected, sorted oldest first, and the first of
    ``image_names`` open in the viewer with its metadata.

    Args:
        url: The server's base URL.
        image_names: The node's output images, rank 1 first (all must be in BOARD).
        out: Where to write the PNG.
        width: Viewport width.
        height: Viewport height.
        timeout_ms: How long to wait for each UI element.

    Raises:
        RuntimeError: When a thumbnail of ``image_names`` does not load.
    """
    with browser_page(width, height) as page:
        page.set_default_timeout(timeout_ms)
        page.goto(url)
        board = page.get_by_text(BOARD, exact=True).first
        board.wait_for()
        page.wait_for_timeout(2000)  # the "What's New" popover opens on a first visit
        close = page.get_by_role("button", name="Close", exact=True)
        for i in range(close.count()):
            if close.nth(i).is_visible():
                close.nth(i).click()
        board.click()
        # rank 1 was saved first: sort the gallery oldest first so it comes first
        page.get_by_role("button", name="Gallery Images/Videos Settings").click()
        if page.get_by_text("Newest First", exact=True).count():
            page.get_by_text("Newest First", exact=True).click()
            page.get_by_text("Oldest First", exact=True).last.click()
        page.keyboard.press("Escape")
        thumbnails = [page.locator(f'img[src*="{name}/thumbnail"]').last for name in image_names]
        for name, thumbnail in zip(image_names, thumbnails):
            thumbnail.wait_for()
            if not thumbnail.evaluate("img => img.decode().then(() => img.naturalWidth > 0, () => false)"):
                raise RuntimeError(f"the thumbnail of {name} did not load")
        thumbnails[0].dblclick()  # open rank 1 in the viewer
        page.get_by_role("button", name="Info (I)").click()
        page.get_by_role("tab", name="Metadata").click()
        page.get_by_text('"rank": 1,').wait_for()
        if page.get_by_role("button", name="Toggle Left Panel (T)").count() and \
                page.get_by_text("Choose Prompt Template").is_visible():
            page.get_by_role("button", name="Toggle Left Panel (T)").click()  # room for the viewer
        page.mouse.move(width // 2, height - 10)  # no hover tooltip
        page.wait_for_timeout(1500)  # panel animations
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))


def main(argv: list[str] | None = None) -> int:
    """Run the node on a demo generation in a fresh InvokeAI and screenshot its result.

    Args:
        argv: Command-line arguments (``--out``); None: sys.argv.

    Returns:
        The exit status (0).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="the PNG to write (default: docs/host-invokeai.png)")
    args = parser.parse_args(argv)
    python = os.environ.get("DAS_SD_INVOKEAI_PYTHON")
    if not python:
        parser.error("set DAS_SD_INVOKEAI_PYTHON to the python of a venv with invokeai==6.14.2 and das-sd")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from das_sd.registry import DEFAULT_METHOD

    demo, image = demo_generation(PROMPT, SEED)
    with tempfile.TemporaryDirectory(prefix="das-sd-invokeai-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        with invokeai_server(Path(python).absolute(), root, env={"INVOKEAI_HTTP_COMPRESSION_LEVEL": "0"}) as (client, url):
            response = client.post("/api/v1/boards/", params={"board_name": BOARD})
            response.raise_for_status()
            name = upload_generation(client, image, demo["lora"], Path(tmp))
            item = run_node(client, name, demo["store"], board={"board_id": response.json()["board_id"]},
                            method=DEFAULT_METHOD)
            if item["status"] != "completed":
                raise RuntimeError(f"the node failed: {item.get('error_traceback') or item}")
            (output,) = item["session"]["results"].values()
            names = [field["image_name"] for field in output["collection"]]
            assert len(names) == TOP_K, names
            capture_ui(url, names, args.out)
    size = optimize_png(args.out)
    print(f"wrote {args.out} ({size / 1000:.0f} kB): top-{TOP_K} of {PROMPT!r} in board {BOARD!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
