"""Shared pieces of the benchmarks: model configurations, isolated worker processes, peak memory.

Each measurement runs in its own Python process, so that one method's allocations (and the allocator's
cache) never count against another's peak memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# SD 1.x topology (4 levels, 2 ResNet + transformer layers per level, 768-wide text states, 77
# tokens) at a width and resolution this CPU can time in seconds. Random weights: speed only.
SD_PROPORTIONS = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

# SD 1.5's UNet at its real widths, 512 px (64 x 64 latents), with a LoRA on kohya's default SD 1.x
# targets: attention, feed-forward and the 1x1 conv proj_in / proj_out (random weights)
SD15_FULL = dict(SD_PROPORTIONS, sample_size=64, block_out_channels=(320, 640, 1280, 1280))
# SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json's architecture fields),
# at 256 px (32 x 32 latents) instead of 1024 so that a row fits this machine's memory and minutes
SDXL_FULL = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
KOHYA_SD1_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux; else a no-op). A child's
    ru_maxrss starts at its parent's, so getrusage cannot measure a worker's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5\n")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_model(config: str, rank: int, device: str):
    """(pipe-like object with .unet/.scheduler, latent shape (4, h, w), text-state shape (T, d)); an
    SDXL UNet ("sdxl-256") also takes a pooled embedding and size conditioning (``_inputs``)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from das_sd.lora_record import LoraRecipe
    from das_sd.train import add_lora_adapter

    if config == "demo":
        from das_sd.models.loading import embedded_demo_lora_path, load_lora, load_pipeline

        pipe = load_pipeline(device=device)
        load_lora(pipe, embedded_demo_lora_path())
        for name, p in pipe.unet.named_parameters():
            p.requires_grad_("lora_" in name)
        size = pipe.unet.config.sample_size
        cond_shape = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
        return pipe, (4, size, size), cond_shape
    if config not in ("sd-proportions", "sd15-512", "sdxl-256"):
        raise ValueError(f"unknown config {config!r}")
    torch.manual_seed(0)
    shape = {"sd-proportions": SD_PROPORTIONS, "sd15-512": SD15_FULL, "sdxl-256": SDXL_FULL}[config]
    unet = UNet2DConditionModel(**shape)
    if config == "sd-proportions":
        add_lora_adapter(unet, LoraRecipe(rank=rank))
    else:
        names = sorted({n for n, _ in unet.named_modules() if n.endswith(KOHYA_SD1_TARGETS)})
        add_lora_adapter(unet, LoraRecipe(rank=rank, alpha=float(rank), target_modules=names))
    with torch.no_grad():  # a trained LoRA has B != 0; peft initialises B = 0
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    unet.to(device).eval()
    pipe = SimpleNamespace(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    size = shape["sample_size"]
    return pipe, (4, size, size), (77, shape["cross_attention_dim"])


class Meter:
    """Throughput and peak extra memory of a callable, after one warm-up call."""

    def __init__(self, device: str):
        self.device = device

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def measure(self, fn, rows: int, repeats: int) -> dict:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            base = rss_bytes()
        fn()  # warm-up (allocator, one-time caches); its peak counts: the same work
        self._sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() if self.device.startswith("cuda") else peak_rss_bytes()) - base
        best = min(times)
        return {"rows": rows, "seconds": best, "rows_per_s": rows / best, "peak_extra_mb": peak / 2**20,
                "all_seconds": times}


def run_worker(script: Path, spec: dict, timeout: float = 1800) -> dict:
    """Run ``script --worker SPEC`` in a fresh process; it prints one JSON line last."""
    env = os.environ | {"PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_results(name: str, payload: dict) -> Path:
    from das_sd.io import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()} | payload
    atomic_write_json(path, payload)
    return path


RANKED_METHODS = ["das", "das-noleverage", "dtrak", "trak"]  # those a low-precision change can move


def ground_truth_generations(pipe, data: str) -> dict:
    """The planted ground-truth queries of both splits, generated once for every variant compared."""
    from das_sd.evaluate.groundtruth import generate_queries

    return {split: generate_queries(pipe, data, split) for split in ("tune", "test")}


def ranking_effect(attributor, data: str, generations: dict, methods: list[str], reference: dict) -> dict:
    """Ground truth per split and method, and each method's top-10 against ``reference`` (filled with
    this attributor's own scores when empty): the yardstick of the low-precision benchmarks."""
    from das_sd.evaluate.groundtruth import evaluate_ground_truth
    from das_sd.score import ranking

    row = {"groundtruth": {}, "vs_reference": {}}
    for split, gens in generations.items():
        summary = evaluate_ground_truth(attributor, data, split, methods, generations=gens)
        row["groundtruth"][split] = {m: {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
                                     for m, r in summary["methods"].items()}
    latents = torch.cat([lat for split in generations.values() for _, lat in split])
    prompts = [q.prompt for split in generations.values() for q, _ in split]
    features = attributor.query_features(latents, prompts, None, sorted(attributor.store.identity["feature_sets"]))
    for m in methods:
        score = ranking(m, attributor.scores(latents, prompts, m, features))
        top = torch.topk(score, 10, dim=1).indices
        reference.setdefault(m, (score, top))
        ref_score, ref_top = reference[m]
        overlap = [len(set(a) & set(b)) / 10 for a, b in zip(top.tolist(), ref_top.tolist())]
        rel = ((score - ref_score).abs().amax(dim=1) / ref_score.abs().amax(dim=1)).max()
        row["vs_reference"][m] = {"top10_overlap_mean": round(sum(overlap) / len(overlap), 4),
                                  "top10_overlap_min": min(overlap), "max_relative_score_change": float(rel)}
    return row
