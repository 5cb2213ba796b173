"""Where the signed residual's train side comes from, per timestep, on demo images (docs/method.md §9).

    DAS_SD_HOME=/tmp/hq-home OMP_NUM_THREADS=1 nice -n 15 python benchmarks/signed_profile.py [--samples 24]

For the first --samples rows of the demo store, per feature timestep t (unprojected, float32):
the weight ||J_t^T r_t / D|| / ||g_t|| each row brings to u_i (g_t the l1 output gradient, as the
features normalise), its cosine with g_t, and the RMS residual r_t; means over the samples. Writes
benchmarks/results/signed-profile-demo.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()

    from das_sd.attribute import Attributor
    from das_sd.featurize.featurizer import alphas_cumprod_of
    from das_sd.featurize.gradients import per_row_gradients
    from das_sd.featurize.settings import noise_for
    from das_sd.latents import encode_prompts
    from das_sd.toy.demo import prepare_demo

    demo = prepare_demo(progress=False)
    attributor = Attributor(demo["store"])
    pipe, store = attributor.pipe, attributor.store
    settings = attributor.featurizers["das"].settings
    alphas = alphas_cumprod_of(pipe)
    timesteps = settings.feature_timesteps(len(alphas))
    rows = store.rows()[:args.samples]
    x0 = store.load("latents")[:args.samples]
    cond = encode_prompts(pipe, [r.caption for r in rows])
    weight, cosine, rms = (torch.zeros(len(rows), len(timesteps)) for _ in range(3))
    for i, row in enumerate(rows):
        noise = torch.stack([noise_for(settings.noise_seed, row.key, t, tuple(x0.shape[1:])) for t in timesteps])
        args_ = (pipe.unet, x0[i:i + 1].repeat(len(timesteps), 1, 1, 1), noise, torch.tensor(timesteps),
                 cond[i:i + 1].repeat(len(timesteps), 1, 1), alphas)
        with torch.enable_grad():
            g = per_row_gradients(*args_, "l1").double()
            loss = per_row_gradients(*args_, "loss").double() / 2  # J^T r / D
        weight[i] = (loss.norm(dim=1) / g.norm(dim=1)).float()
        cosine[i] = torch.nn.functional.cosine_similarity(loss, g, dim=1).float()
        with torch.no_grad():
            a = alphas[torch.tensor(timesteps)].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0[i:i + 1] + (1 - a).sqrt() * noise
            pred = pipe.unet(xt, torch.tensor(timesteps), encoder_hidden_states=args_[4]).sample
            rms[i] = (pred - noise).pow(2).flatten(1).mean(1).sqrt()
    share = weight / weight.sum(dim=1, keepdim=True)
    out = {"samples": len(rows), "timesteps": timesteps,
           "weight_mean": [round(float(v), 4) for v in weight.mean(0)],
           "weight_share_mean": [round(float(v), 4) for v in share.mean(0)],
           "cosine_with_g_mean": [round(float(v), 4) for v in cosine.mean(0)],
           "rms_residual_mean": [round(float(v), 4) for v in rms.mean(0)],
           "command": "DAS_SD_HOME=/tmp/hq-home OMP_NUM_THREADS=1 nice -n 15 python benchmarks/signed_profile.py "
                      + " ".join(sys.argv[1:])}
    for key in ("weight_share_mean", "cosine_with_g_mean", "rms_residual_mean"):
        print(key, out[key])
    print(save_results("signed-profile-demo", out))


if __name__ == "__main__":
    main()
