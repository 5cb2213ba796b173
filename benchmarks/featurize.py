"""Featurization cost against a training step and against a published-style reference featurizer.

    python benchmarks/featurize.py [--configs demo,sd-proportions] [--ranks 4,16] [--device cpu]
    python benchmarks/featurize.py --configs sd15-512 --ranks 4 --methods train,das-sd --repeats 1
    python benchmarks/featurize.py --configs sdxl-256 --ranks 4 --methods train,das-sd --repeats 1 --out featurize-sdxl-256

Configurations: demo (the embedded model and LoRA), sd-proportions (SD's block layout at a quarter
width, 256 px), sd15-512 (SD 1.5's UNet at its real widths and 512 px, LoRA on kohya's default SD 1.x
targets including the 1x1 conv projections; about 25 s per row on 2 CPU cores), sdxl-256 (SDXL base's
UNet at its real widths and depths, 2.6 B parameters, at 256 px; LoRA on the same kohya targets).

Per configuration, three ways to process the same rows (a row = one sample at one timestep):
  train      a plain batched training step: forward + backward of the diffusion loss, same LoRA
  das-sd     das_sd's Featurizer: per-timestep-normalised, projected LoRA gradients (k = --dim)
  reference  as the published DAS / D-TRAK code: per timestep, torch.func vmap(grad(functional_call))
             per-sample LoRA gradients, normalised and summed over timesteps in gradient space, then
             one dense Gaussian projection per batch generated block by block from a seed (checked
             against das-sd's exact gradients before it is timed)
Each runs in its own process (peak memory is the growth over the loaded model). Prints rows/s, peak
memory and the ratios the performance targets are about; writes benchmarks/results/featurize.json.
Residual weights (forward passes only) are timed separately: they are not gradient work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Meter, load_model, run_worker, save_results  # noqa: E402


def _inputs(pipe, latent_shape, cond_shape, samples: int, device: str):
    from das_sd.conditioning import Conditioning, model_family

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(samples, *latent_shape, generator=g).to(device)
    cond = (torch.randn(samples, *cond_shape, generator=g) * 0.5).to(device)
    if model_family(pipe) == "sdxl":  # pooled embedding (SDXL's 1280) and the native size of the latents
        side = 8 * latent_shape[-1]
        pooled = torch.randn(samples, 1280, generator=g) * 0.5
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * samples, dtype=torch.float32)
        cond = Conditioning(cond, pooled.to(device), time_ids.to(device))
    return x0, cond, [f"sample-{i}" for i in range(samples)]


def _autocast(x0, dtype):
    return torch.autocast(device_type=x0.device.type, dtype=dtype, enabled=dtype is not None)


def train_step_fn(pipe, x0, cond, timesteps: int, autocast=None):
    """One optimisation step's gradient work over samples x timesteps rows."""
    from das_sd.conditioning import unet_kwargs
    from das_sd.featurize.featurizer import alphas_cumprod_of
    from das_sd.noising import noisy_latents

    unet = pipe.unet
    alphas = alphas_cumprod_of(pipe).to(x0.device)
    rows_x0 = x0.repeat_interleave(timesteps, 0)
    rows_c = cond.repeat_interleave(timesteps, 0)
    t = torch.randint(0, len(alphas), (len(rows_x0),), generator=torch.Generator().manual_seed(1)).to(x0.device)
    noise = torch.randn_like(rows_x0)
    params = [p for p in unet.parameters() if p.requires_grad]

    def step():
        with _autocast(x0, autocast):
            pred = unet(noisy_latents(rows_x0, noise, t, alphas), t, **unet_kwargs(rows_c, unet.dtype)).sample
        torch.nn.functional.mse_loss(pred.float(), noise).backward()
        for p in params:
            p.grad = None
    return step


def das_sd_fn(pipe, x0, cond, keys, timesteps: int, dim: int, autocast=None):
    from das_sd.featurize.featurizer import Featurizer
    from das_sd.featurize.settings import FeaturizerSettings

    featurizer = Featurizer(pipe, FeaturizerSettings(num_timesteps=timesteps, projection_dim=dim), autocast)
    return lambda: featurizer.features(x0, cond, keys), featurizer


def residual_fn(featurizer, x0, cond, keys):
    return lambda: featurizer.residuals(x0, cond, keys)


def _das_sd_rows(pipe, x0, keys, timesteps: int):
    """das-sd's timesteps, noise (one row per (sample, timestep), sample-major) and alpha-bars, so
    that the reference differentiates exactly the rows das-sd does."""
    from das_sd.featurize.featurizer import Featurizer
    from das_sd.featurize.settings import FeaturizerSettings

    featurizer = Featurizer(pipe, FeaturizerSettings(num_timesteps=timesteps))
    noise = featurizer._noise(keys, featurizer.timesteps, tuple(x0.shape[1:])).to(x0.device)
    return featurizer.timesteps, noise, featurizer.alphas


def reference_fn(pipe, x0, cond, keys, timesteps: int, dim: int, block_rows: int = 16384):
    """As the published DAS / D-TRAK feature code: for each timestep, vmap(grad(functional_call))
    per-sample LoRA gradients of the batch, each unit-normalised and summed over timesteps in
    gradient space; then one dense Gaussian projection per batch, generated block by block from a
    seed as TRAK's BasicProjector does off CUDA. Returns (run, unprojected): ``unprojected`` gives
    the averaged gradients before projection, for the check against das-sd."""
    from torch.func import functional_call, grad, vmap

    from das_sd.noising import noisy_latents

    unet = pipe.unet
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    num_params = sum(p.numel() for p in params.values())
    grid, noise, alphas = _das_sd_rows(pipe, x0, keys, timesteps)
    noise = noise.view(len(x0), len(grid), *x0.shape[1:])

    def f(p, x, t, c):
        pred = functional_call(unet, p, (x[None], t[None]), {"encoder_hidden_states": c[None]}).sample
        return pred.abs().mean()

    per_sample = vmap(grad(f), in_dims=(None, 0, 0, 0))

    def unprojected():
        emb = None
        for j, t in enumerate(grid):
            rows_t = torch.full((len(x0),), t, device=x0.device)
            g = per_sample(params, noisy_latents(x0, noise[:, j], rows_t, alphas), rows_t, cond)
            flat = torch.cat([g[n].reshape(len(x0), -1) for n in names], dim=1)
            flat = flat / flat.norm(dim=1, keepdim=True)
            emb = flat if emb is None else emb + flat
        return emb / len(grid)

    def run():
        emb = unprojected()
        out = torch.zeros(len(x0), dim, device=x0.device)
        for b, start in enumerate(range(0, num_params, block_rows)):
            gen = torch.Generator(device=x0.device).manual_seed(b)
            block = torch.randn(min(block_rows, num_params - start), dim, generator=gen, device=x0.device)
            out += emb[:, start:start + block_rows] @ block / dim ** 0.5
        return out
    return run, unprojected


def reference_matches_das_sd(pipe, unprojected, x0, cond, keys, timesteps: int) -> float:
    """Largest relative difference between the reference's averaged gradients and das-sd's exact
    per-row gradients (unprojected, same noise and timesteps, same normalisation)."""
    from das_sd.featurize.gradients import per_row_gradients

    grid, noise, alphas = _das_sd_rows(pipe, x0, keys, timesteps)
    rows_t = torch.tensor(grid, device=x0.device).repeat(len(x0))
    g = per_row_gradients(pipe.unet, x0.repeat_interleave(len(grid), 0), noise, rows_t,
                          cond.repeat_interleave(len(grid), 0), alphas, "l1")
    ours = (g / g.norm(dim=1, keepdim=True)).view(len(x0), len(grid), -1).mean(1)
    theirs = unprojected()
    return ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max().item()


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = spec["device"]
    pipe, latent_shape, cond_shape = load_model(spec["config"], spec["rank"], device)
    x0, cond, keys = _inputs(pipe, latent_shape, cond_shape, spec["samples"], device)
    rows = spec["samples"] * spec["timesteps"]
    meter = Meter(device)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.get("autocast", "fp32")]
    if spec["method"] == "train":
        fn = train_step_fn(pipe, x0, cond, spec["timesteps"], autocast)
    elif spec["method"] == "das-sd":
        fn, _ = das_sd_fn(pipe, x0, cond, keys, spec["timesteps"], spec["dim"], autocast)
    elif spec["method"] == "residuals":
        _, featurizer = das_sd_fn(pipe, x0, cond, keys, spec["timesteps"], spec["dim"], autocast)
        fn = residual_fn(featurizer, x0, cond, keys)
        result = meter.measure(fn, spec["samples"], spec["repeats"])
        return result | {"unit": "samples (T_E = 100 forward passes each)"}
    elif spec["method"] == "reference":
        # float32 whatever --autocast says: as the published code computes (and torch.func's vmap
        # fails under CPU bfloat16 autocast: "expected scalar type BFloat16 but found Float")
        fn, unprojected = reference_fn(pipe, x0, cond, keys, spec["timesteps"], spec["dim"])
    else:
        raise ValueError(spec["method"])
    from das_sd.featurize.lora_layers import num_lora_parameters
    result = meter.measure(fn, rows, spec["repeats"]) | {"lora_parameters": num_lora_parameters(pipe.unet)}
    if spec["method"] == "reference":  # checked after timing: the check's memory must not count
        result["max_rel_diff_vs_das_sd"] = reference_matches_das_sd(pipe, unprojected, x0, cond, keys,
                                                                    spec["timesteps"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="demo,sd-proportions")
    parser.add_argument("--ranks", default="4,16", help="LoRA ranks of the sd-proportions config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=2048, help="k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="train,das-sd,reference,residuals")
    parser.add_argument("--autocast", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast of the train step's and das-sd's forward / backward (the reference: float32)")
    parser.add_argument("--out", default="featurize")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    script = Path(__file__).resolve()
    runs = []
    for config in args.configs.split(","):
        # rows per call: demo 8 samples x 8 timesteps; the wider model 2 x 4 (seconds per call here)
        samples, timesteps = {"demo": (8, 8), "sd15-512": (1, 2), "sdxl-256": (1, 2)}.get(config, (2, 4))
        if args.device.startswith("cuda"):
            samples *= 4
        for rank in ([8] if config == "demo" else [int(r) for r in args.ranks.split(",")]):
            entry = {"config": config, "rank": rank, "samples": samples, "timesteps": timesteps, "methods": {}}
            for method in args.methods.split(","):
                spec = {"config": config, "rank": rank, "method": method, "samples": samples,
                        "timesteps": timesteps, "dim": args.dim, "repeats": args.repeats, "device": args.device,
                        "autocast": args.autocast}
                entry["methods"][method] = run_worker(script, spec)
                r = entry["methods"][method]
                shown = r.get("error") or f"{r['rows_per_s']:9.1f} rows/s  peak +{r['peak_extra_mb']:7.1f} MB"
                print(f"{config:15s} r={rank:<3d} {method:10s} {shown}", flush=True)
            m = entry["methods"]
            ok = lambda name: name in m and "error" not in m[name]  # noqa: E731
            if ok("das-sd") and ok("train"):
                entry["throughput_vs_train"] = m["das-sd"]["rows_per_s"] / m["train"]["rows_per_s"]
                entry["memory_vs_train"] = m["das-sd"]["peak_extra_mb"] / max(m["train"]["peak_extra_mb"], 1e-9)
            if ok("das-sd") and ok("reference"):
                entry["throughput_vs_reference"] = m["das-sd"]["rows_per_s"] / m["reference"]["rows_per_s"]
            ratios = {k: round(v, 3) for k, v in entry.items() if k.endswith(("_train", "_reference"))}
            print(f"{config:15s} r={rank:<3d} ratios {ratios}", flush=True)
            runs.append(entry)
    path = save_results(args.out, {"device": args.device, "autocast": args.autocast, "dim": args.dim,
                                   "command": " ".join(sys.argv),
                                   "targets": {"throughput_vs_train": ">= 0.67", "throughput_vs_reference": ">= 10",
                                               "memory_vs_train": "<= 2"}, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
