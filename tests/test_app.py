"""The Gradio app, served for real on localhost and driven through gradio_client and a real Chromium.

Expectations come from outside the app: the `das-sd attribute --json` command and the das_sd API run
in this process on the same image and settings.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from das_sd.app import AppConfig, Workbench
from das_sd.app.ui import build_app
from das_sd.attribute import Attributor
from das_sd.cli import main as cli_main
from das_sd.registry import DEFAULT_METHOD
from das_sd.generation import GenerationSettings, generate
from helpers import chromium_page

TOP_K = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(demo, tmp_path_factory):
    """The app on the demo, as `das-sd demo` serves it: (url, workbench)."""
    from das_sd.app.ui import launch_options

    config = AppConfig(store=Path(demo["store"]), base=Path(demo["base"]), lora=Path(demo["lora"]),
                       data=Path(demo["data"]), device="cpu", demo=True,
                       outdir=tmp_path_factory.mktemp("app-outputs"))
    bench = Workbench(config)
    app = build_app(bench)
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               **launch_options(bench))
    yield f"http://127.0.0.1:{port}/", bench
    app.close()


@pytest.fixture(scope="module")
def reference(demo):
    """An Attributor of its own, outside the app, for independent expectations."""
    return Attributor(demo["store"], device="cpu")


def value(output):
    """An output's value (outputs that also change visibility arrive as update dicts)."""
    return output["value"] if isinstance(output, dict) and output.get("__type__") == "update" else output


def generate_via_api(client: Client, prompt: str, seed: int, n: int = 1, method: str = "das"):
    out = client.predict(prompt, "", seed, 25, 4.0, 1.0, n, method, TOP_K, api_name="/generate")
    return [value(o) for o in out[:-1]], out[-1]  # slot outputs, attribution JSON (list, one per image)


def expected_keys(reference: Attributor, prompt: str, seed: int, method: str = "das") -> list[str]:
    result = generate(reference.pipe, GenerationSettings(prompt=prompt, seed=seed))
    return [r.key for r in reference.attribute_latents(result.latents, [prompt], method, TOP_K)[0].results]


def test_generate_and_attribute_match_the_cli(served, reference, demo, tmp_path, capsys):
    url, _ = served
    client = Client(url, verbose=False)
    prompt = "zorblat, a green square on a orange background"
    slots, results = generate_via_api(client, prompt, seed=3)
    image_path, gallery = slots[0], slots[1]
    assert len(results) == 1 and len(results[0]["results"]) == TOP_K
    keys = [r["key"] for r in results[0]["results"]]
    # the gallery shows k training images, captioned with rank, score and the training caption
    assert len(gallery) == TOP_K
    for row, item in zip(results[0]["results"], gallery):
        assert item["caption"].startswith(f"#{row['rank']} ") and row["caption"] in item["caption"]
        assert Path(item["image"]).read_bytes() == Path(row["file"]).read_bytes()
    # generation attributes its final latents: same as the API on the same seed, outside the app
    assert keys == expected_keys(reference, prompt, seed=3)

    # the downloaded PNG carries its prompt; the CLI and the app's Attribute tab agree on it
    png = tmp_path / "generated.png"
    png.write_bytes(Path(image_path).read_bytes())
    capsys.readouterr()
    assert cli_main(["attribute", "--store", demo["store"], "--image", str(png), "--top-k", str(TOP_K),
                     "--json", "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["query"]["prompt"] == prompt
    out = client.predict(handle_file(str(png)), "", DEFAULT_METHOD, TOP_K, api_name="/attribute")  # the CLI's default
    upload_gallery, upload_json = value(out[1]), out[4]
    assert [r["key"] for r in upload_json["results"]] == [r["key"] for r in cli["results"]]
    assert [r["score"] for r in upload_json["results"]] == pytest.approx([r["score"] for r in cli["results"]], rel=1e-5)
    assert len(upload_gallery) == TOP_K


def test_rerank_switches_method_without_regenerating(served, reference):
    url, _ = served
    client = Client(url, verbose=False)
    prompt = "quimvex, a orange circle on a purple background"
    generate_via_api(client, prompt, seed=5)
    out = client.predict("dtrak", TOP_K, api_name="/rerank")
    results = out[-1]
    assert results[0]["method"] == "dtrak"
    assert [r["key"] for r in results[0]["results"]] == expected_keys(reference, prompt, 5, method="dtrak")


def test_four_clients_at_once_get_their_own_results(served, reference):
    url, _ = served
    prompts = ["zorblat, a red circle on a blue background", "drelkin, a white square on a black background",
               "glimber, a yellow triangle on a green background", "a blue circle on a yellow background, dotted style"]
    got: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def session(i: int) -> None:
        try:
            _, results = generate_via_api(Client(url, verbose=False), prompts[i], seed=10 + i)
            got[i] = [r["key"] for r in results[0]["results"]]
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i in range(4):
        assert got[i] == expected_keys(reference, prompts[i], 10 + i), f"client {i}"


def test_only_dataset_images_are_served(served, demo):
    url, _ = served

    def status(path: Path) -> int:
        try:
            with urllib.request.urlopen(f"{url}gradio_api/file={path}") as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    inside = next(Path(demo["data"]).glob("**/*.png"))
    assert status(inside.resolve()) == 200
    for outside in (Path("/etc/passwd"), Path(demo["store"]) / "manifest.json", Path(demo["lora"]),
                    Path(demo["data"]) / ".." / "store" / "manifest.json"):
        assert status(outside) in (403, 404), outside
    # of the dataset folder, only its images: not the captions, metadata or planted ground truth
    data = Path(demo["data"]).resolve()
    assert (data / "metadata.jsonl").is_file() and (data / "ground_truth.json").is_file()
    for hidden in ("metadata.jsonl", "ground_truth.json", "images/../metadata.jsonl", "METADATA.JSONL"):
        assert status(f"{data}/{hidden}") in (403, 404), hidden
    try:  # Gradio's other spelling of the route
        urllib.request.urlopen(f"{url}gradio_api/file/{data}/metadata.jsonl")
        raise AssertionError("metadata.jsonl served")
    except urllib.error.HTTPError as exc:
        assert exc.code in (403, 404)


def test_dataset_guard_serves_images_only(tmp_path):
    from das_sd.app.ui import DatasetImagesOnly

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"png")
    (root / "metadata.jsonl").write_text("{}")
    (root / "images" / "alias.png").symlink_to(root / "metadata.jsonl")
    guard = DatasetImagesOnly(None, root)
    assert guard.servable(str(root / "images" / "a.png")) and guard.servable(str(root / "images" / "A.PNG"))
    assert guard.servable("/etc/passwd")  # outside the dataset: Gradio's own rules refuse it
    assert guard.servable("https://example.com/x.json")
    for path in (root / "metadata.jsonl", root / "images" / ".." / "metadata.jsonl", root / "images" / "alias.png",
                 root / "images", root):
        assert not guard.servable(str(path)), path


def test_bad_uploads_and_prompts_get_readable_errors(served, tmp_path):
    url, _ = served
    client = Client(url, verbose=False)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(corrupt)), "a prompt", "das", TOP_K, api_name="/attribute")
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (64, 48), "red").save(big)
    with pytest.raises(Exception, match="64x48"):
        client.predict(handle_file(str(big)), "a prompt", "das", TOP_K, api_name="/attribute")
    small = tmp_path / "plain.png"
    Image.new("RGB", (32, 32), "red").save(small)  # no metadata and an empty prompt box
    with pytest.raises(Exception, match="no prompt") as err:
        client.predict(handle_file(str(small)), "", "das", TOP_K, api_name="/attribute")
    assert "Prompt box" in str(err.value) and "--prompt" not in str(err.value)  # the app has no flags to pass
    assert "/tmp/gradio" not in str(err.value)  # the upload is named, not where the server keeps it
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(clear)
    with pytest.raises(Exception, match="clear.png: the image is fully transparent"):
        client.predict(handle_file(str(clear)), "a prompt", "das", TOP_K, api_name="/attribute")
    from test_images import png_header

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(22000, 22000))  # < 1 kB on disk, 1.45 GB decoded
    with pytest.raises(Exception, match="bomb.png: image of 484,000,000 pixels, over das-sd's limit"):
        client.predict(handle_file(str(bomb)), "a prompt", "das", TOP_K, api_name="/attribute")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="junk.png: not a readable image") as err:
        client.predict(handle_file(str(junk)), "a prompt", "das", TOP_K, api_name="/attribute")
    assert "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_long_prompts_are_shortened_and_their_truncation_reported(served, reference, tmp_path):
    from das_sd.png_metadata import save_png

    url, _ = served
    client = Client(url, verbose=False)
    long = "zorblat, a green square on a orange background, " * 200  # 10,000 characters
    result = generate(reference.pipe, GenerationSettings(prompt="zorblat, a green square on a orange background"))
    path = save_png(result.images[0], tmp_path / "long.png", {**result.metadata(0), "prompt": long})
    out = client.predict(handle_file(str(path)), "", "das", TOP_K, api_name="/attribute")
    note = out[3]
    assert len(note) < 600 and "…" in note, note
    assert "longer than the text encoder reads" in note and "tokens had no effect" in note
    with pytest.raises(Exception, match="Type a prompt first"):  # the validator answers the API too
        client.predict("  ", "", 0, 25, 4.0, 1.0, 1, "das", TOP_K, api_name="/generate")


def test_missing_store_is_a_message_not_a_traceback(tmp_path):
    bench = Workbench(AppConfig(store=tmp_path / "nowhere"))
    status = bench.store_status()
    assert not status["ready"] and "no feature store" in status["problem"]
    with pytest.raises(ValueError, match="no feature store here"):
        bench.generate(GenerationSettings(prompt="a red circle on a blue background"))
    with pytest.raises(ValueError, match="pass --base and --lora"):
        bench.pipe  # nothing names the model to load
    with pytest.raises(ValueError, match="pass --data"):
        Workbench(AppConfig(store=tmp_path / "nowhere", base=tmp_path, lora=tmp_path)).build_store(progress=False)


def test_browser_generate_shows_captioned_attributions(served, tmp_path):
    url, _ = served
    with chromium_page() as page:
        page.goto(url)
        page.locator("#prompt textarea").fill("glimber, a red square on a blue background")
        page.locator("#generate").click()
        thumbs = page.locator("#attribution-0 img")
        thumbs.first.wait_for(timeout=300_000)
        page.wait_for_function("document.querySelectorAll('#attribution-0 img').length >= 8", timeout=60_000)
        captions = page.locator("#attribution-0").inner_text()
        thumbs.first.click()
        page.locator("#detail").get_by_text("Key:").wait_for(timeout=60_000)
        detail = page.locator("#detail").inner_text()
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert "#1 " in captions and "#8 " in captions and "glimber" in captions
    assert "Caption:" in detail and "File:" in detail
    assert (tmp_path / "app.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def served_store(demo, tmp_path_factory):
    """The app as `das-sd app --store <demo store>` serves it (not the demo mode): (url, workbench)."""
    from das_sd.app.ui import launch_options

    bench = Workbench(AppConfig(store=Path(demo["store"]), device="cpu", outdir=tmp_path_factory.mktemp("store-app")))
    app = build_app(bench)
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               **launch_options(bench))
    yield f"http://127.0.0.1:{port}/", bench
    app.close()


def screenshot_folder(tmp_path: Path) -> Path:
    """Where the newcomer test saves its screenshots: DAS_SD_SCREENSHOTS (`make screenshots` sets it
    to docs/, rewriting the README's), else the test's own folder."""
    return Path(os.environ.get("DAS_SD_SCREENSHOTS") or tmp_path)


def shown_shares(text: str) -> list[float]:
    """The percentages of gallery captions "#1 · 23.4% · caption", in order."""
    return [float(m) for m in re.findall(r"#\d+ · (\d+(?:\.\d+)?)%", text)]


def test_browser_newcomer_generates_from_an_example_and_inspects(served_store, reference, demo, tmp_path):
    """A new user's first minutes, in a real Chromium 1400 px wide: nothing typed, nothing read first."""
    from das_sd.data.ground_truth import load_ground_truth

    url, _ = served_store
    triggers = [g["trigger"] for g in load_ground_truth(demo["data"])["groups"]]
    captions = {row.caption for row in reference.rows}
    shots = screenshot_folder(tmp_path)
    with chromium_page(width=1400, height=1000) as page:
        page.goto(url)
        # the prompt box holds a prompt the LoRA knows; the examples are its trigger-word captions
        prompt = page.locator("#prompt textarea")
        examples = page.locator("#examples")
        examples.wait_for(timeout=60_000)
        # Gradio fills the examples' rows after the element appears (slower on a loaded machine): wait for them
        page.wait_for_function("ts => ts.every(t => document.querySelector('#examples').innerText.includes(t))",
                               arg=triggers, timeout=60_000)
        listed = examples.inner_text()
        assert all(t in listed for t in triggers), listed
        first = prompt.input_value()
        assert first in captions and first.split(",")[0] in triggers
        # the seed's button is text, not an emoji a stock browser has no glyph for
        assert page.locator("#random-seed").inner_text().strip() == "Random"
        # the empty state says what will appear
        assert "Generate" in page.locator("#generate-hint").inner_text()
        assert "Click a training image" in page.locator("#detail").inner_text()

        # an empty prompt: one message at the prompt box, no component in an error state
        prompt.fill("")
        page.locator("#generate").click()
        page.get_by_text("Type a prompt first").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        assert page.locator(".error").count() == 0 and "Error" not in page.locator("#attribution-0").inner_text()

        # click an example: it fills the prompt; Generate shows 8 training images with their shares
        chosen = next(e for e in listed.splitlines() if e.strip().startswith(triggers[1] + ",")).strip()
        examples.get_by_text(chosen, exact=True).click()
        # Gradio fills the prompt from the server's answer to the click: wait for it, then check it
        page.wait_for_function("v => document.querySelector('#prompt textarea').value === v", arg=chosen,
                               timeout=30_000)
        assert prompt.input_value() == chosen
        page.locator("#generate").click()
        page.wait_for_function("document.querySelectorAll('#attribution-0 img').length >= 8", timeout=300_000)
        page.locator("#generate-hint").wait_for(state="hidden", timeout=30_000)
        gallery_text = page.locator("#attribution-0").inner_text()
        # the shares shown are those of the Python API on the same prompt and seed, to display rounding
        result = generate(reference.pipe, GenerationSettings(prompt=chosen, seed=0))
        expected = reference.attribute_latents(result.latents, [chosen], DEFAULT_METHOD, 8)[0].results  # the UI's default
        shares = shown_shares(gallery_text)
        assert len(shares) == 8, gallery_text
        assert shares == pytest.approx([100 * r.share for r in expected], abs=0.051), gallery_text
        assert sum(shares) <= 100.5 and expected[0].caption in gallery_text

        # click a training image: it is shown large, its share explained, its raw score beside
        page.locator("#attribution-0 img").first.click()
        page.locator("#detail").get_by_text("of the influence on this image").wait_for(timeout=60_000)
        detail = page.locator("#detail").inner_text()
        large = page.locator("#detail-image img")
        large.wait_for(timeout=60_000)
        thumb = page.locator("#attribution-0 img").first.bounding_box()
        assert large.bounding_box()["width"] > 2 * thumb["width"]
        assert expected[0].caption in detail and f"Raw {DEFAULT_METHOD} score" in detail and "sum to 100" in detail
        page.screenshot(path=str(shots / "app-demo.png"), full_page=True)

        # Inspect: its empty state explains itself (real headers, no "1 2 3"); run it on the examples
        page.get_by_role("tab", name="Inspect").click()
        assert "mean share %" in page.locator("#leader-table").inner_text()
        assert "Click **Inspect**" not in page.locator("#inspect-groups").inner_text()  # rendered, not raw
        assert "Click Inspect" in page.locator("#inspect-groups").inner_text()
        assert all(t in page.locator("#inspect-prompts textarea").input_value() for t in triggers)
        page.locator("#inspect").click()
        page.locator("#leaderboard img").first.wait_for(timeout=600_000)
        board = page.locator("#leaderboard").inner_text()
        assert "%" in board and "#1 " in board
        page.locator("#leaderboard img").first.click()
        page.locator("#influenced img").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "app-inspect.png"), full_page=True)
    for name in ("app-demo.png", "app-inspect.png"):
        assert (shots / name).stat().st_size > 20_000


INSPECT_PROMPTS = "quimvex, a red circle on a blue background\npomfrit, a white square on a green background"


def test_inspect_tab_ranks_like_the_python_api(served, reference, tmp_path):
    from das_sd.inspect import InspectSettings, generate_queries, inspect_generations

    url, _ = served
    client = Client(url, verbose=False)
    groups_md, gallery, table, influenced, files = client.predict(
        INSPECT_PROMPTS, 2, "column:concept", None, InspectSettings().method, TOP_K, api_name="/inspect")
    prompts = INSPECT_PROMPTS.splitlines()
    queries = generate_queries(reference, prompts, 2, tmp_path / "generations", InspectSettings(top_k=TOP_K))
    expected = inspect_generations(reference, queries, 4, InspectSettings(top_k=TOP_K), "column:concept").image_rows()
    shown = [Path(item["image"]).read_bytes() for item in value(gallery)]
    assert shown == [Path(r["path"]).read_bytes() for r in expected[:len(shown)]]
    assert [row[1] for row in value(table)["data"]][:5] == [r["caption"] for r in expected[:5]]
    assert "| group | images |" in groups_md and "quimvex" in groups_md
    names = sorted(Path(f).name for f in files)
    assert names == ["groups.csv", "images.csv", "inspection.json", "report.html"]


def test_browser_inspect_leaderboard_lists_influenced_generations(served):
    url, _ = served
    with chromium_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Inspect").click()
        page.locator("#inspect-prompts textarea").fill(INSPECT_PROMPTS)
        page.locator("#inspect").click()
        page.locator("#leaderboard img").first.wait_for(timeout=300_000)
        page.locator("#leaderboard img").first.click()
        page.locator("#influenced img").first.wait_for(timeout=60_000)
        assert page.locator("#influenced img").count() >= 1
        assert "%" in page.locator("#influenced").inner_text()


def test_index_tab_builds_then_extends_a_store(demo, tmp_path):
    """The Index tab's button: a missing store is built, images added to the dataset are featurized
    without touching what is stored, and the app then attributes with it."""
    source = Path(demo["data"])
    lines = (source / "metadata.jsonl").read_text().splitlines()
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)

    def write(rows):
        for row in rows:
            name = json.loads(row)["file_name"]
            (data / name).write_bytes((source / name).read_bytes())
        (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")

    picked = lines[::20]  # styles and trigger groups alike
    write(picked[:10])
    bench = Workbench(AppConfig(store=tmp_path / "store", base=Path(demo["base"]), lora=Path(demo["lora"]),
                                data=data, device="cpu", outdir=tmp_path / "out"))
    assert not bench.store_status()["ready"]
    status = bench.build_store(progress=False)
    assert status["ready"] and status["samples"] == 10 and set(status["feature_sets"]) == {"das", "dtrak", "trak"}
    assert all(s["lambda"] > 0 for s in status["feature_sets"].values())
    first_shard = (tmp_path / "store" / "features-00000.safetensors").read_bytes()

    write(picked)
    status = bench.build_store(progress=False)
    assert status["ready"] and status["samples"] == len(picked)
    assert (tmp_path / "store" / "features-00000.safetensors").read_bytes() == first_shard
    query = bench.generate(GenerationSettings(prompt="zorblat, a red circle on a blue background", seed=1))[0]
    result = bench.rank(query, "das", 3)
    assert len(result.results) == 3 and all(Path(r.path).parent.parent == data for r in result.results)


def test_inspect_never_opens_a_server_path_a_request_names(served, tmp_path):
    """Group mappings come from an upload or from the dataset folder; /etc/passwd, a missing path,
    '..' and /dev/zero are refused alike, at once, without reading anything."""
    import time

    url, bench = served
    client = Client(url, verbose=False)
    answers = {}
    runs = set(bench.inspect_root.glob("*"))
    for group in ("file:/etc/passwd", "file:/nonexistent/x.csv", "file:../store/manifest.json", "file:/dev/zero"):
        started = time.monotonic()
        with pytest.raises(Exception) as err:
            client.predict(INSPECT_PROMPTS, 1, group, None, "das", TOP_K, api_name="/inspect")
        assert time.monotonic() - started < 30
        answers[group] = str(err.value).replace(group, "G")
        assert "must be a file inside the dataset folder" in answers[group], answers[group]
        assert "root:x" not in answers[group] and "No such file" not in answers[group]
    assert len(set(answers.values())) == 1, answers  # no existence oracle
    assert set(bench.inspect_root.glob("*")) == runs  # refused before generating anything

    mapping = tmp_path / "groups.csv"
    rows = bench.attributor.rows
    mapping.write_text("file,group\n" + "".join(f"{Path(r.path).name},{'even' if i % 2 else 'odd'}\n"
                                                for i, r in enumerate(rows)))
    groups_md = client.predict(INSPECT_PROMPTS, 1, "", handle_file(str(mapping)), "das", TOP_K,
                               api_name="/inspect")[0]
    assert r"file\:groups\.csv" in groups_md and "| even |" in groups_md and "| odd |" in groups_md
    big = tmp_path / "big.csv"
    big.write_text("a.png,x\n" * 200_000)
    with pytest.raises(Exception, match="the uploaded mapping big.csv: the group mapping is larger than 1024 KB"):
        client.predict(INSPECT_PROMPTS, 1, "", handle_file(str(big)), "das", TOP_K, api_name="/inspect")


def test_group_by_is_checked_before_any_model_is_loaded(tmp_path):
    import os

    data = tmp_path / "data"
    data.mkdir()
    (data / "groups.json").write_text(json.dumps({"a.png": "alice"}))
    os.mkfifo(data / "pipe.csv")
    bench = Workbench(AppConfig(store=tmp_path / "nowhere", data=data))
    assert bench.groups("file:groups.json") == ("file:groups.json", {"a.png": "alice"})
    assert bench.groups(" column:concept ") == ("column:concept", None) and bench.groups("") == (None, None)
    for group, message in (("file:/etc/passwd", "inside the dataset folder"), ("file:../x", "inside the dataset folder"),
                           ("file:pipe.csv", "not a regular file"), ("file:/dev/zero", "inside the dataset folder"),
                           ("nonsense", "expected folder, column:NAME or file:PATH")):
        with pytest.raises(ValueError, match=message):
            bench.inspect(["a prompt"], 1, "das", TOP_K, group)
    with pytest.raises(ValueError, match="the uploaded mapping m.csv: line 1: expected two columns"):
        (tmp_path / "m.csv").write_text("just one column\n")
        bench.groups(None, tmp_path / "m.csv")
    assert bench._pipe is None and bench._attributor is None


def test_unresolvable_file_urls_are_refused_without_a_traceback(tmp_path, capfd):
    """A NUL byte in the requested path, or a symlink loop in the dataset folder, made the file
    guard raise (500 and a traceback): they are refused like any other file that is not an image."""
    from PIL import Image

    from das_sd.app.ui import launch_options

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(data / "images" / "a.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "images/a.png", "text": "a red square"}) + "\n")
    (data / "loop.png").symlink_to("loop.png")
    bench = Workbench(AppConfig(store=tmp_path / "nowhere", data=data, outdir=tmp_path / "out"))  # no model loaded
    app = build_app(bench)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(bench))
    try:
        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={path}") as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert get(f"{data}/images/a.png")[0] == 200
        for path in (f"{data}/metadata.jsonl%00.png", "/tmp/x%00", f"{data}/images/a.png%00", f"{data}/loop.png",
                     f"{data}/loop.png/x.png"):
            code, body = get(path)
            assert code in (403, 404) and b"Traceback" not in body and b"Error" not in body, (path, code, body)
    finally:
        app.close()
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err + logged.out and "Exception in ASGI application" not in logged.err


HOSTILE = ("<img src=x onerror=alert(1)> [link](javascript:alert(1)) [site](https://example.com) **bold** "
           "a|b $$x$$ `tick` \\* &amp;")


def rendered_text(markdown: str) -> tuple[str, str]:
    """(HTML, its text) of ``markdown`` rendered as CommonMark with GFM tables, as Gradio's Markdown does."""
    import html
    import re

    markdown_it = pytest.importorskip("markdown_it")
    page = markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)
    return page, html.unescape(re.sub(r"<[^>]+>", "", page))


def test_user_text_is_shown_literally_in_the_apps_markdown():
    """Captions (a user's metadata.jsonl), prompts, group names and paths may carry Markdown or HTML:
    the app's Markdown shows them as text, never as an image, a link or bold."""
    import gradio as gr

    from das_sd.app.events import guarded
    from das_sd.app.values import Query
    from das_sd.app.views import detail_of, groups_markdown, status_markdown, upload_note

    page, _ = rendered_text(f"**Caption:** {HOSTILE}")
    assert "<img" in page and "<a href" in page and "<strong>bold" in page  # unescaped, it would render

    result = {"method": "das", "results": [{"rank": 1, "score": 2.5, "sign": 1, "caption": HOSTILE,
                                            "key": "k`<b>", "path": f"/data/{HOSTILE}.png"}]}
    image, markdown = detail_of(result, 0)
    assert image == f"/data/{HOSTILE}.png"
    groups = [{"name": HOSTILE, "size": 3, "size_share": 0.5, "mean_share": 0.25, "ci_low": 0.1, "ci_high": 0.4}]
    status = {"store": f"/s/{HOSTILE}", "samples": 3, "complete": True, "resolution": 32, "base": "/b",
              "base_fingerprint": "sha256:ab", "lora": "/l", "lora_fingerprint": "sha256:cd", "dataset": "/d",
              "feature_sets": {}, "problem": HOSTILE}
    query = Query(latents=None, prompt=HOSTILE + "\nsecond line", features={}, image_path="x.png",
                  info={"prompt_from": "metadata"})
    for markdown, shown in ((markdown, HOSTILE), (markdown, "k`<b>"), (markdown, f"/data/{HOSTILE}.png"),
                            (groups_markdown(groups, f"column:{HOSTILE}"), HOSTILE),
                            (groups_markdown(groups, f"column:{HOSTILE}"), f"column:{HOSTILE}"),
                            (status_markdown(status), HOSTILE), (status_markdown(status), f"/s/{HOSTILE}"),
                            (status_markdown({"store": HOSTILE, "problem": HOSTILE}), HOSTILE),
                            (upload_note(query), HOSTILE + " second line")):
        page, text = rendered_text(markdown)
        assert "<img" not in markdown and "<img" not in page and "<a " not in page, markdown
        assert "<strong>bold" not in page and "<code>tick" not in page, page
        assert shown in text, (shown, text)
    page, text = rendered_text(groups_markdown(groups, "folder"))
    assert f"<td>{HOSTILE.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</td>" in page  # one cell

    @guarded
    def fails():
        raise ValueError(f"{HOSTILE}.png: not a readable image")

    with pytest.raises(gr.Error) as err:  # Gradio renders an alert's message as HTML
        fails()
    assert "<img" not in err.value.message and "&lt;img src=x onerror=alert(1)&gt;" in err.value.message


def test_a_group_mapping_is_checked_against_the_store(served, tmp_path):
    """A mapping that matches no training image (the dataset's metadata.jsonl read as CSV) is refused
    at once, naming it; one that covers part of the store is used, and the app says how much."""
    import time

    url, bench = served
    client = Client(url, verbose=False)
    runs = set(bench.inspect_root.glob("*"))
    started = time.monotonic()
    with pytest.raises(ValueError, match="group by file:metadata.jsonl: the mapping gives no training image"):
        bench.groups("file:metadata.jsonl")  # no model needed to refuse it
    with pytest.raises(Exception, match="group by file:metadata.jsonl: the mapping gives no training image"):
        client.predict(INSPECT_PROMPTS, 1, "file:metadata.jsonl", None, "das", TOP_K, api_name="/inspect")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text((Path(bench.dataset_root()) / "metadata.jsonl").read_text())
    with pytest.raises(Exception, match="group by file:wrong.csv: the mapping gives no training image"):
        client.predict(INSPECT_PROMPTS, 1, "", handle_file(str(wrong)), "das", TOP_K, api_name="/inspect")
    assert time.monotonic() - started < 60 and set(bench.inspect_root.glob("*")) == runs  # nothing generated

    rows = bench.attributor.rows
    part = tmp_path / "part.csv"
    part.write_text("file,group\n" + "".join(f"{Path(r.path).name},first\n" for r in rows[:10]) + "gone.png,x\n")
    groups_md = client.predict(INSPECT_PROMPTS, 1, "", handle_file(str(part)), "das", TOP_K, api_name="/inspect")[0]
    _, text = rendered_text(groups_md)
    assert (f'Mapping file:part.csv: 10 of its 11 entries name a training image; 10 of the {len(rows)} training '
            f'images have a group, {len(rows) - 10} in "(none)"') in text, text
