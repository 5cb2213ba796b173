"""A real `invokeai-web` with das-sd's node pack, and the API calls that drive it.

Shared by tests/hosts/test_invokeai_node.py and benchmarks/screenshot_invokeai.py: start the server
in a fresh root with extensions/invokeai-das-sd in its nodes/ folder, install models through its model
manager, upload images with metadata and run the DAS Attribution node through the session queue.
Failures raise (RuntimeError, TimeoutError); pytest turns them into test failures.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

NODES = Path(__file__).resolve().parents[2] / "extensions" / "invokeai-das-sd"
PROMPT = "quimvex, a red circle on a blue background"  # a demo prompt (the demo LoRA's trigger word)
SEED = 11
TOP_K = 5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now.

    Returns:
        The port number.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def http_server(command: list[str], env: dict[str, str], log_path: Path, url: str, ready_path: str, name: str,
                start_timeout: float, cwd: Path | None = None) -> Iterator[httpx.Client]:
    """Start a host's server process, wait until ``url + ready_path`` answers 200, stop it on exit.

    Args:
        command: The server's command line.
        env: Its environment.
        log_path: Where its stdout and stderr go.
        url: Its base URL.
        ready_path: A path that answers 200 once it serves.
        name: The server's name, for the error message.
        start_timeout: Seconds to wait for it.
        cwd: Its working directory (None: this process's).

    Returns:
        A context manager yielding an httpx client on ``url``.

    Raises:
        RuntimeError: When the server exits or does not answer in time (with the log's tail).
    """
    log = log_path.open("wb")
    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=url, timeout=60)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n" + log_path.read_text(errors="replace")[-3000:])
            try:
                if client.get(ready_path).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield client
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@contextmanager
def invokeai_server(python: Path, root: Path, start_timeout: float = 180,
                    env: dict[str, str] | None = None) -> Iterator[tuple[httpx.Client, str]]:
    """Run `invokeai-web` (next to ``python``) on a free port with ``root`` as its root and the node
    pack copied into ``root/nodes``; stop it on exit. Its log is ``root/server.log``.

    Args:
        python: The python of a venv with invokeai and das-sd installed.
        root: An empty folder for InvokeAI's root (database, images, models, nodes).
        start_timeout: Seconds to wait for the API to answer.
        env: Extra environment variables for the server (InvokeAI reads ``INVOKEAI_<SETTING>``).

    Returns:
        A context manager yielding an httpx client on the server's API and the server's base URL.

    Raises:
        RuntimeError: When the server exits or does not answer in time (with the log's tail).
    """
    shutil.copytree(NODES, root / "nodes" / NODES.name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = {**os.environ, "HF_HUB_OFFLINE": "1", "INVOKEAI_HOST": "127.0.0.1", "INVOKEAI_PORT": str(port),
                  **(env or {})}
    command = [str(Path(python).parent / "invokeai-web"), "--root", str(root)]
    with http_server(command, server_env, root / "server.log", url, "/api/v1/app/version", "invokeai-web",
                     start_timeout) as client:
        yield client, url


def upload(client: httpx.Client, image: Image.Image, metadata: dict | None) -> str:
    """Upload a PNG to InvokeAI's gallery (category user), with ``metadata`` as its InvokeAI metadata.

    Args:
        client: A client on the server's API.
        image: The image.
        metadata: InvokeAI-style metadata (positive_prompt, loras, ...); None: none.

    Returns:
        The image's name in InvokeAI.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = {"metadata": json.dumps(metadata)} if metadata is not None else {}
    response = client.post("/api/v1/images/upload", params={"image_category": "user", "is_intermediate": "false"},
                           files={"file": ("query.png", buffer.getvalue(), "image/png")}, data=data)
    response.raise_for_status()
    return response.json()["image_name"]


def run_node(client: httpx.Client, image_name: str, store: str, timeout: float = 300, **inputs) -> dict:
    """Enqueue a one-node graph (DAS Attribution on ``image_name``, method das, cpu) and wait for the
    queue item to finish.

    Args:
        client: A client on the server's API.
        image_name: An uploaded image's name.
        store: The das-sd feature store folder.
        timeout: Seconds to wait for the queue item.
        **inputs: Further node inputs (prompt, top_k, board, ...), overriding the defaults.

    Returns:
        The finished queue item (status completed, failed or canceled; session results).

    Raises:
        TimeoutError: When the item does not finish in ``timeout`` seconds.
    """
    node = {"id": "das", "type": "das_attribution", "image": {"image_name": image_name}, "store_path": store,
            "top_k": TOP_K, "method": "das", "device": "cpu", **inputs}
    batch = {"batch": {"graph": {"id": str(uuid.uuid4()), "nodes": {"das": node}, "edges": []}, "runs": 1}}
    response = client.post("/api/v1/queue/default/enqueue_batch", json=batch)
    response.raise_for_status()
    item_id = response.json()["item_ids"][0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = client.get(f"/api/v1/queue/default/i/{item_id}").json()
        if item["status"] in ("completed", "failed", "canceled"):
            return item
        time.sleep(0.5)
    raise TimeoutError(f"queue item {item_id} did not finish in {timeout:g} s")


def install_model(client: httpx.Client, path: Path) -> dict:
    """Register a model file or folder with InvokeAI's model manager (in place), as a user would;
    InvokeAI's probe decides its type and base.

    Args:
        client: A client on the server's API.
        path: The model file or folder.

    Returns:
        The metadata entry InvokeAI's graphs write: key, hash, name, base, type.

    Raises:
        RuntimeError: When the install job fails or does not finish in 120 s.
    """
    response = client.post("/api/v2/models/install", params={"source": str(path), "inplace": "true"}, json={})
    response.raise_for_status()
    job = response.json()["id"]
    for _ in range(240):
        job_state = client.get(f"/api/v2/models/install/{job}").json()
        if job_state["status"] in ("completed", "error"):
            if job_state["status"] != "completed":
                raise RuntimeError(f"the install job of {path} failed: {job_state}")
            config = job_state["config_out"]
            return {"key": config["key"], "hash": config["hash"], "name": config["name"],
                    "base": config["base"], "type": config["type"]}
        time.sleep(0.5)
    raise RuntimeError(f"the install job of {path} did not finish")


def upload_generation(client: httpx.Client, image: Image.Image, lora_file: str | Path, workdir: Path,
                      prompt: str = PROMPT, seed: int = SEED) -> str:
    """Install a copy of ``lora_file`` through InvokeAI's model manager and upload ``image`` with the
    metadata InvokeAI's generation graphs write (prompt, seed and that LoRA at weight 1).

    Args:
        client: A client on the server's API.
        image: The generated image.
        lora_file: The LoRA the image was generated with (copied to ``workdir``/demo_style.safetensors,
            so InvokeAI names the model demo_style).
        workdir: A folder for the LoRA's copy (installed in place: it must outlive the server's use).
        prompt: The image's prompt.
        seed: The image's seed.

    Returns:
        The uploaded image's name in InvokeAI.
    """
    lora_copy = Path(workdir) / "demo_style.safetensors"
    shutil.copy(lora_file, lora_copy)
    lora = install_model(client, lora_copy)
    return upload(client, image, {"positive_prompt": prompt, "seed": seed, "loras": [{"model": lora, "weight": 1.0}]})
