"""docs/host-webui.png and docs/host-webui-txt2img.png: the webui extension in a real Stable Diffusion WebUI Forge.

Needs a Forge checkout and a Python that runs it with das-sd installed; neither is part of this
repository. Set-up (what `make screenshots-webui` expects in build/; Forge dfdcbab6, gradio 4.40.0):

    # build/forge: a checkout of lllyasviel/stable-diffusion-webui-forge, with
    #   repositories/huggingface_guess (lllyasviel/huggingface_guess) and
    #   repositories/stable-diffusion-webui-assets (AUTOMATIC1111/stable-diffusion-webui-assets)
    python3.11 -m venv build/forge-venv
    build/forge-venv/bin/pip install -r build/forge/requirements_versions.txt   # brought torch 2.12.1 here
    build/forge-venv/bin/pip install transformers==4.51.3 diffusers==0.35.2 peft==0.17.1 "accelerate>=1.2,<1.11" \
        "pillow>=10,<11" "huggingface-hub>=0.34,<1.0" "tokenizers>=0.21,<0.22"    # das-sd's minimum versions
    build/forge-venv/bin/pip install --no-deps -e .

(accelerate >= 1.2 because peft 0.17 imports accelerate's clear_device_cache; Forge pins 0.31.)

The script starts Forge's launch.py (--skip-prepare-environment --always-cpu, no checkpoint) on a free
port of 127.0.0.1 with a temporary --data-dir holding a copy of extensions/sd-webui-das-sd, the demo
LoRA in models/Lora/ and, as a PNG saved the way the webui saves its images (the infotext in a
``parameters`` text chunk, the LoRA as a ``<lora:demo_style:1>`` tag), a demo generation: the demo
LoRA's prompt generated on the embedded tiny SD with the demo LoRA (as in the InvokeAI and ComfyUI
screenshots). Forge cannot load the tiny SD itself (it builds CLIP and the VAE at SD's real widths
from its own configs), so the image is not generated in Forge: it is dropped into the tab's "Attribute
an image made earlier" in headless Chromium, attributed there, and the page is screenshotted; then the
script's accordion in txt2img, opened.

Usage: python benchmarks/screenshot_webui.py --webui build/forge --python build/forge-venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "hosts"), str(ROOT / "tests")]

from helpers import browser_page, webui_png  # noqa: E402  (tests/helpers.py)
from invokeai_server import PROMPT, SEED, free_port, http_server  # noqa: E402  (the same demo query)
from screenshots import demo_generation, optimize_png  # noqa: E402  (benchmarks/screenshots.py)

EXTENSION = ROOT / "extensions" / "sd-webui-das-sd"
OUT = ROOT / "docs" / "host-webui.png"
LORA = "demo_style"


def capture_tab(url: str, query: Path, out: Path, accordion_out: Path, width: int = 1400, height: int = 1000,
                timeout_ms: int = 300_000) -> list[str]:
    """Open the DAS attribution tab, drop ``query`` into "Attribute an image made earlier", attribute
    it and screenshot the page; then screenshot the script's accordion in txt2img.

    Args:
        url: The webui's base URL.
        query: The PNG to attribute.
        out: Where to write the screenshot of the tab.
        accordion_out: Where to write the screenshot of the script's accordion in txt2img.
        width: Viewport width.
        height: Viewport height.
        timeout_ms: How long to wait for the UI and the attribution.

    Returns:
        The gallery's captions, best first.

    Raises:
        RuntimeError: When the tab shows no result.
    """
    with browser_page(width, height) as page:
        page.goto(url, wait_until="load", timeout=timeout_ms)  # the UI polls: the network never idles
        tab = page.get_by_role("tab", name="DAS attribution")
        tab.wait_for(timeout=timeout_ms)
        tab.click()
        page.get_by_text("Attribute an image made earlier").click()
        page.locator("#das_attribution_upload input[type=file]").set_input_files(str(query))
        page.locator("#das_attribution_upload img").first.wait_for(timeout=timeout_ms)
        page.locator("#das_attribution_attribute").click()
        status = page.locator("#das_attribution_status")
        # the status shows "processing | 1.2s" until the handler's answer (a result, or what went wrong)
        page.wait_for_function("() => /method|failed|prompt|image/i.test("
                               "document.querySelector('#das_attribution_status').innerText)", timeout=timeout_ms)
        if "method" not in status.inner_text():
            page.screenshot(path=str(out))
            raise RuntimeError(f"the tab shows no attribution: {status.inner_text()!r} (page: {out})")
        page.locator("#das_attribution_gallery img").first.wait_for(timeout=timeout_ms)
        page.wait_for_timeout(1500)  # let the thumbnails paint
        captions = page.locator("#das_attribution_gallery .caption-label").all_inner_texts()
        page.screenshot(path=str(out), full_page=True)
        # the script's accordion in txt2img, opened: where attribution is switched on for generations
        page.get_by_role("tab", name="Txt2img").click()
        accordion = page.locator("#script_txt2img_das_attribution_accordion")
        accordion.get_by_text("DAS attribution").first.click()
        page.wait_for_timeout(800)
        accordion.screenshot(path=str(accordion_out))
        return captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", type=Path, default=ROOT / "build" / "forge", help="the Forge checkout")
    parser.add_argument("--python", type=Path, default=ROOT / "build" / "forge-venv" / "bin" / "python",
                        help="the Python that runs it (its requirements and das-sd installed)")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the screenshot")
    args = parser.parse_args(argv)
    for path, what in [(args.webui / "launch.py", "--webui (a Forge checkout)"), (args.python, "--python")]:
        if not path.exists():
            parser.error(f"{what}: {path} does not exist (see this script's docstring for the set-up)")

    demo, image = demo_generation(PROMPT, SEED)
    with tempfile.TemporaryDirectory(prefix="das-sd-webui-") as tmp:
        data = Path(tmp)
        shutil.copytree(EXTENSION, data / "extensions" / EXTENSION.name)
        (data / "models" / "Lora").mkdir(parents=True)
        shutil.copy(demo["lora"], data / "models" / "Lora" / f"{LORA}.safetensors")
        (data / "models" / "Stable-diffusion").mkdir(parents=True)
        width, height = image.size
        query = webui_png(image, data / f"00000-{SEED}.png",
                          f"<lora:{LORA}:1>, {PROMPT}\nSteps: 20, Sampler: DDIM, CFG scale: 5, Seed: {SEED}, "
                          f"Size: {width}x{height}, Lora hashes: \"{LORA}\"")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [str(args.python), "launch.py", "--skip-prepare-environment", "--skip-install",
                   "--skip-python-version-check", "--skip-torch-cuda-test", "--no-download-sd-model",
                   "--always-cpu", "--data-dir", str(data), "--server-name", "127.0.0.1", "--port", str(port),
                   "--das-store", str(demo["store"]), "--das-device", "cpu"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        accordion_out = args.out.with_name(args.out.stem + "-txt2img.png")
        with http_server(command, env, data / "server.log", url, "/", "Forge", 600, cwd=args.webui):
            try:
                captions = capture_tab(url, query, args.out, accordion_out)
            except Exception:
                print((data / "server.log").read_text(errors="replace")[-4000:], file=sys.stderr)
                raise
        log = (data / "server.log").read_text(errors="replace")
    for path in (args.out, accordion_out):
        print(f"{path}: {optimize_png(path)} bytes")
    print(f"top-{len(captions)}: {captions}")
    if "[das-sd]" in log:
        print("the extension reported:", *[line for line in log.splitlines() if "[das-sd]" in line], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
