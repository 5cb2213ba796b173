"""`das-sd inspect` from paths: open the store, make or read the generations, roll the credit up and
write the report files."""

from __future__ import annotations

from pathlib import Path

from .. import generation
from ..io import read_prompt_file
from .generations import IMAGE_SUFFIXES, generate_queries, image_queries
from .inspection import Inspection, InspectSettings, Progress, inspect_generations


def inspect_store(store: str | Path, out: str | Path, settings: InspectSettings, prompts: str | Path | None = None,
                  images: str | Path | None = None, seeds: int = 2, group_by: str | None = None,
                  base: str | Path | None = None, lora: str | Path | None = None, device: str | None = None,
                  progress: Progress | None = None) -> tuple[Inspection, dict[str, Path]]:
    """Inspect a store over many generations and write the report (inspection.json, CSVs, report.html).

    Args:
        store: feature store folder.
        out: report folder (generated PNGs go to ``out/generations``).
        settings: method, top-k, batch size, bootstrap and duplicate threshold.
        prompts: text file with one prompt per line, generated with seeds 0..seeds-1; or None.
        images: folder of generated images whose metadata holds their prompt; or None.
        seeds: generations per prompt (with ``prompts``).
        group_by: training-image groups: "folder", "column:NAME" or "file:PATH" (None: no groups).
        base: base model folder, when it moved since featurizing (None: the one the store names).
        lora: LoRA file or folder, likewise.
        device: "cpu", "cuda", ... (None: CUDA when available).
        progress: called as ``progress(done, total, generation id)`` after each generation.

    Returns:
        The inspection and the report files written, by name.

    Raises:
        ValueError: unless exactly one of ``prompts`` and ``images`` is given, or when ``seeds`` < 1.
    """
    from ..attribute import Attributor  # looked up at call time: tests stand a fake in for the model

    if bool(prompts) == bool(images):
        raise ValueError("give exactly one of --prompts FILE and --images DIR")
    if seeds < 1:
        raise ValueError("--seeds must be at least 1")
    attributor = Attributor(store, device=device, base=base, lora=lora)
    out = Path(out)
    if prompts:
        prompt_list = read_prompt_file(prompts)
        generation.warn_truncated_prompts(attributor.pipe.tokenizer, prompt_list)
        total = len(prompt_list) * seeds
        queries = generate_queries(attributor, prompt_list, seeds, out / "generations", settings)
    else:
        folder = Path(images)
        total = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0
        queries = image_queries(attributor, folder)
    inspection = inspect_generations(attributor, queries, total, settings, group_by, progress=progress)
    return inspection, inspection.save(out)
