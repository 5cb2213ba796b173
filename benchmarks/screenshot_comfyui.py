"""docs/host-comfyui.png: the DAS Load Store / DAS Attribute nodes and their result in a real ComfyUI web UI.

Needs a ComfyUI checkout and a Python that runs it with das-sd installed; neither is part of this
repository. Set-up (what `make screenshots-comfyui` expects in build/; ComfyUI a125cd84, version
0.3.64, frontend comfyui-frontend-package 1.27.10):

    # build/comfyui: a checkout of comfyanonymous/ComfyUI (any recent one: it needs the core PreviewAny node)
    python3.11 -m venv build/comfyui-venv
    build/comfyui-venv/bin/pip install torch==2.14.1 torchvision==0.29.1   # the wheels on this machine's disk
    build/comfyui-venv/bin/pip install -c constraints.txt -r build/comfyui/requirements.txt diffusers peft
    build/comfyui-venv/bin/pip install --no-deps -e .

(torchaudio, which ComfyUI's requirements list, is left out: only its audio nodes and models need
it.)

The script starts `main.py --cpu` on a free port of 127.0.0.1 with a temporary --base-directory
holding a copy of extensions/comfyui-das-sd in custom_nodes/, the demo LoRA in models/loras/ and a
demo generation (the demo LoRA's prompt, generated on the embedded tiny SD with the demo LoRA, as in
the InvokeAI screenshot) in input/; it checks the log for the node pack's import and the nodes in
/object_info. It then opens the UI in headless Chromium, loads the API-format workflow()
(LoadImage -> DAS Attribute <- DAS Load Store; its IMAGE output -> Upscale Image (32 -> 128 pixels,
nearest) -> Preview Image, its JSON -> Preview Any) with the frontend's app.loadApiJson, queues it
from the UI (app.api.queuePrompt of app.graphToPrompt: a POST /prompt), waits for the prompt in
/history and for the preview images on the canvas, and screenshots the page.

Usage: python benchmarks/screenshot_comfyui.py --comfyui build/comfyui --python build/comfyui-venv/bin/python
(or DAS_SD_COMFYUI and DAS_SD_COMFYUI_PYTHON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "hosts"), str(ROOT / "tests")]

from helpers import browser_page  # noqa: E402  (tests/helpers.py)
from invokeai_server import PROMPT, SEED, TOP_K, free_port, http_server  # noqa: E402  (the same demo query)
from screenshots import demo_generation, optimize_png  # noqa: E402  (benchmarks/screenshots.py)

NODES = ROOT / "extensions" / "comfyui-das-sd"
OUT = ROOT / "docs" / "host-comfyui.png"
QUERY = "das-sd-query.png"
LORA = "demo_style.safetensors"
# node id -> canvas position and size (x, y, width, height) in the screenshot
LAYOUT = {"1": (20, 60, 300, 330), "2": (20, 430, 300, 110), "3": (360, 60, 340, 230),
          "6": (740, 60, 320, 170), "4": (740, 270, 590, 360), "5": (360, 330, 340, 500)}
DISPLAY_SIZE = 128  # the demo's 32 x 32 training images, scaled up (nearest) for Preview Image


def workflow(store: str, method: str) -> dict:
    """The API-format workflow: the demo generation in LoadImage, attributed by DAS Attribute with the
    store of DAS Load Store; the top-k training images, scaled up to DISPLAY_SIZE by Upscale Image,
    in Preview Image, the JSON in Preview Any.

    Args:
        store: The das-sd feature store folder.
        method: The attribution method.

    Returns:
        The workflow (node id -> class_type and inputs), as POST /prompt takes it.
    """
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": QUERY}},
        "2": {"class_type": "DASLoadStore", "inputs": {"store_path": store, "device": "cpu"}},
        "3": {"class_type": "DASAttribute", "inputs": {"das_store": ["2", 0], "images": ["1", 0], "prompt": PROMPT,
                                                       "method": method, "top_k": TOP_K, "lora_name": LORA}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "6": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "upscale_method": "nearest-exact",
                                                     "width": DISPLAY_SIZE, "height": DISPLAY_SIZE,
                                                     "crop": "disabled"}},
    }


@contextmanager
def comfyui_server(comfyui: Path, python: Path, base: Path,
                   start_timeout: float = 300) -> Iterator[tuple[httpx.Client, str]]:
    """Run ComfyUI's main.py (--cpu) on a free port with ``base`` as its base directory; stop it on exit.
    Its log is ``base/server.log``.

    Args:
        comfyui: The ComfyUI checkout (holds main.py).
        python: The Python that runs it (ComfyUI's requirements and das-sd installed).
        base: ComfyUI's --base-directory (custom_nodes/, models/, input/, output/, user/).
        start_timeout: Seconds to wait for the server to answer.

    Returns:
        A context manager yielding an httpx client on the server and its base URL.

    Raises:
        RuntimeError: When the server exits or does not answer in time (with the log's tail).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch"]
    with http_server(command, env, base / "server.log", url, "/system_stats", "ComfyUI", start_timeout,
                     cwd=comfyui) as client:
        yield client, url


def check_nodes_loaded(client: httpx.Client, log: Path) -> dict:
    """Fail unless the node pack imported and both nodes are in /object_info.

    Args:
        client: A client on the server.
        log: The server's log.

    Returns:
        /system_stats (ComfyUI's version and the Python it runs).

    Raises:
        RuntimeError: On an import failure in the log or a node missing from /object_info.
    """
    text = log.read_text(errors="replace")
    if any("IMPORT FAILED" in line and NODES.name in line for line in text.splitlines()):
        raise RuntimeError("the node pack failed to import:\n" + text[-3000:])
    info = client.get("/object_info").json()
    missing = {"DASLoadStore", "DASAttribute", "PreviewAny"} - set(info)
    if missing:
        raise RuntimeError(f"not in /object_info: {sorted(missing)}:\n" + text[-3000:])
    return client.get("/system_stats").json()


def wait_for_history(client: httpx.Client, prompt_id: str, timeout: float = 600) -> dict:
    """Wait until ``prompt_id`` is in /history; fail when it did not succeed.

    Args:
        client: A client on the server.
        prompt_id: The queued prompt's id.
        timeout: Seconds to wait.

    Returns:
        The prompt's history entry (its outputs by node id).

    Raises:
        RuntimeError: When the prompt failed or did not finish in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = client.get(f"/history/{prompt_id}").json().get(prompt_id)
        if entry and entry.get("status", {}).get("completed"):
            return entry
        if entry and entry.get("status", {}).get("status_str") == "error":
            raise RuntimeError(f"the workflow failed: {json.dumps(entry['status'])[:3000]}")
        time.sleep(1)
    raise RuntimeError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")


# In the page: the frontend's app (window.app, or comfyAPI.app.app), the API workflow loaded as a
# graph (the minimap hidden), nodes placed by LAYOUT, the view reset, and the graph queued; returns the prompt id.
LOAD_AND_QUEUE = """async ([api, layout]) => {
  const app = window.app || window.comfyAPI.app.app;
  await app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
  await app.loadApiJson(api, "das-sd attribution");
  for (const [id, [x, y, w, h]] of Object.entries(layout)) {
    const node = app.graph.getNodeById(Number(id));
    node.pos = [x, y];
    node.size = [w, h];
  }
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [0, 0];
  app.graph.setDirtyCanvas(true, true);
  const res = await app.api.queuePrompt(0, await app.graphToPrompt());
  return res.prompt_id;
}"""


def capture_ui(url: str, client: httpx.Client, api: dict, out: Path, width: int = 1400, height: int = 900,
               timeout_ms: int = 120_000) -> dict:
    """Load ``api`` into ComfyUI's UI, queue it from there and screenshot the page with its result.

    Args:
        url: The server's base URL.
        client: A client on the server (to follow the prompt in /history).
        api: The API-format workflow.
        out: Where to write the PNG.
        width: Viewport width.
        height: Viewport height.
        timeout_ms: How long to wait for the UI.

    Returns:
        The prompt's history entry.

    Raises:
        RuntimeError: When the workflow fails or the preview images do not show.
    """
    with browser_page(width, height) as page:
        page.set_default_timeout(timeout_ms)
        page.goto(url)
        page.wait_for_function("() => (window.app || window.comfyAPI?.app?.app)?.graph !== undefined")
        page.wait_for_timeout(3000)  # first-visit dialogs (templates) open after the graph
        page.keyboard.press("Escape")
        prompt_id = page.evaluate(LOAD_AND_QUEUE, [api, LAYOUT])
        entry = wait_for_history(client, prompt_id)
        # the preview node's images decoded on the canvas
        page.wait_for_function("""() => {
          const app = window.app || window.comfyAPI.app.app;
          const imgs = app.graph.getNodeById(4).imgs || [];
          return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""")
        page.mouse.move(width - 5, height - 5)  # no hover highlight
        page.evaluate("() => (window.app || window.comfyAPI.app.app).graph.setDirtyCanvas(true, true)")
        page.wait_for_timeout(1500)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        return entry


def main(argv: list[str] | None = None) -> int:
    """Run the DAS nodes on a demo generation in a fresh ComfyUI and screenshot the UI with the result.

    Args:
        argv: Command-line arguments (``--comfyui``, ``--python``, ``--out``); None: sys.argv.

    Returns:
        The exit status (0).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("DAS_SD_COMFYUI"),
                        help="the ComfyUI checkout (default: $DAS_SD_COMFYUI)")
    parser.add_argument("--python", type=Path, default=os.environ.get("DAS_SD_COMFYUI_PYTHON"),
                        help="the Python of ComfyUI's venv, with das-sd installed (default: $DAS_SD_COMFYUI_PYTHON)")
    parser.add_argument("--out", type=Path, default=OUT, help="the PNG to write (default: docs/host-comfyui.png)")
    args = parser.parse_args(argv)
    if args.comfyui is None or not (args.comfyui / "main.py").is_file():
        parser.error("give --comfyui (or DAS_SD_COMFYUI): a ComfyUI checkout with main.py")
    if args.python is None:
        parser.error("give --python (or DAS_SD_COMFYUI_PYTHON): the python of a venv with ComfyUI's "
                     "requirements and das-sd")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from das_sd.registry import DEFAULT_METHOD

    demo, image = demo_generation(PROMPT, SEED)
    with tempfile.TemporaryDirectory(prefix="das-sd-comfyui-") as tmp:
        base = Path(tmp)
        shutil.copytree(NODES, base / "custom_nodes" / NODES.name)
        (base / "models" / "loras").mkdir(parents=True)
        shutil.copy(demo["lora"], base / "models" / "loras" / LORA)
        (base / "input").mkdir()
        (base / "user").mkdir()  # ComfyUI's database goes there
        image.save(base / "input" / QUERY)
        with comfyui_server(args.comfyui.absolute(), args.python.absolute(), base) as (client, url):
            stats = check_nodes_loaded(client, base / "server.log")
            api = workflow(str(demo["store"]), DEFAULT_METHOD)
            entry = capture_ui(url, client, api, args.out)
        report = json.loads(entry["outputs"]["5"]["text"][0])
    images = entry["outputs"]["4"]["images"]
    keys = [r["key"] for r in report["attributions"][0]["results"]]
    if len(images) != TOP_K or len(keys) != TOP_K or report.get("warning"):
        raise RuntimeError(f"unexpected result: {len(images)} preview images, keys {keys}, "
                           f"warning {report.get('warning')}")
    size = optimize_png(args.out)
    print(f"wrote {args.out} ({size / 1000:.0f} kB): ComfyUI {stats['system']['comfyui_version']}, "
          f"top-{TOP_K} of {PROMPT!r} ({DEFAULT_METHOD}): {keys}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
