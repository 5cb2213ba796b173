"""The featurizer: latents + caption embeddings -> projected LoRA-gradient features and residual weights.

phi(z) = P^T (1/K) sum_t g_{z,t} / ||g_{z,t}||   (normalisation optional)      docs/method.md §8
e_z    = residual weight over T_E timesteps                                      docs/method.md §9

Rows are independent and the noise of (z, t) depends only on (seed, key(z), t), so a feature does
not depend on the batch it was computed in (up to float rounding of batched matmuls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..models.modes import eval_mode
from ..conditioning import Conditioning, unet_kwargs
from ..noising import noisy_latents, prediction_type, training_target
from ..projection import BlockProjector
from .gradients import RESIDUAL_HEAD, accumulation_dtype, forward_rows, projected_row_gradients, residual_norms
from .lora_layers import num_lora_parameters
from ..memory import memory_budget, rows_per_pass, saved_bytes
from .settings import FeaturizerSettings, noise_for

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def alphas_cumprod_of(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """abar_t of the training schedule: a DDPMScheduler built from the pipeline's scheduler config.

    See docs/method.md §2; the pipeline's own (sampling) scheduler is not used for it.

    Args:
        pipe: The Stable Diffusion pipeline.

    Returns:
        (T,) float32 on the CPU, T the number of training timesteps (1000 for SD 1.x).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.float()


def autocast_supported(dtype: torch.dtype | None, device: torch.device | str) -> bool:
    """Whether featurizing under autocast to ``dtype`` is offered on ``device``: bfloat16 anywhere,
    float16 on CUDA only (CPUs have no fast float16 matmuls; bfloat16 ones where AVX-512 BF16 or AMX
    is present).

    Args:
        dtype: The autocast dtype; None (no autocast) is offered everywhere.
        device: The device featurizing runs on.

    Returns:
        True when offered.
    """
    kind = torch.device(device).type
    return dtype is None or dtype == torch.bfloat16 or (dtype == torch.float16 and kind == "cuda")


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); elsewhere bfloat16
    autocast is emulated and slower than float32. (torch.cpu's probes are private: absent = no.)

    Returns:
        True when either probe says so.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def autocast_dtype(compute_dtype: str) -> torch.dtype | None:
    """The autocast dtype of a compute dtype (das_sd.registry.AUTOCAST_DTYPES' values): None for float32.

    Args:
        compute_dtype: "float32", "float16" or "bfloat16", as a store's identity records it.

    Returns:
        None for "float32" (no autocast), else the torch dtype of that name.
    """
    return None if compute_dtype == "float32" else getattr(torch, compute_dtype)


def store_autocast(compute_dtype: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for featurizing queries on ``device`` against a store computed in
    ``compute_dtype`` (its identity's field): the store's own where the device runs it natively,
    else float32 (a bfloat16 store built on a GPU stays usable, and fast, on a laptop's CPU; the
    features differ by about 1.5 %, see benchmarks/precision.py).

    Args:
        compute_dtype: The store identity's ``compute_dtype``: "float32", "float16" or "bfloat16".
        device: The device the queries are featurized on.

    Returns:
        The autocast dtype to use, or None for float32 (no autocast).
    """
    dtype = autocast_dtype(compute_dtype)
    if not autocast_supported(dtype, device):
        return None
    if dtype is not None and torch.device(device).type == "cpu" and not cpu_has_fast_bfloat16():
        return None
    return dtype


class Featurizer:
    """Computes features for batches of (latent, caption embedding, key) with a pipeline's LoRA.

    The UNet is the caller's: it is switched to eval mode only while a method computes.

    Args:
        pipe: The base pipeline with the LoRA loaded; its UNet and scheduler config (abar_t and the
            prediction type, docs/method.md §2) are used.
        settings: The feature set's settings (timesteps, output function, projection, residual).
        autocast_dtype: Run the UNet under autocast to this dtype (bfloat16 / float16); None for
            none (float32).
        max_memory: Bytes one forward / backward pass may take; the rows of a batch are cut into
            passes that fit (``das_sd.memory``). None: most of what the device has free.

    Raises:
        ValueError: When the UNet has no LoRA layers.
        ModelError: When the scheduler's prediction type is not one das-sd supports.
    """

    def __init__(self, pipe: StableDiffusionPipeline, settings: FeaturizerSettings,
                 autocast_dtype: torch.dtype | None = None, max_memory: int | None = None):
        self.unet = pipe.unet  # switched to eval mode only while it computes (the caller's model)
        self.settings = settings
        self.device = self.unet.device
        self.alphas = alphas_cumprod_of(pipe).to(self.device)
        self.prediction_type = prediction_type(pipe)  # the target of f = loss and of the residuals
        self.num_train_timesteps = len(self.alphas)
        self.timesteps = settings.feature_timesteps(self.num_train_timesteps)
        self.num_params = num_lora_parameters(self.unet)
        self.projector = BlockProjector.shared(settings.projector_spec(), self.num_params, device=self.device)
        self.autocast_dtype = autocast_dtype
        self.max_memory = max_memory
        self._row_bytes: dict[tuple, int] = {}  # measured saved bytes of one row, per input shape

    def rows_per_pass(self, x0_row: torch.Tensor, noise_row: torch.Tensor, t_row: torch.Tensor,
                      cond_row: torch.Tensor | Conditioning, rows: int) -> int:
        """How many rows one forward / backward pass takes within the memory budget.

        The first call per input shape measures one row's saved activations (one extra forward).

        Args:
            x0_row: One row's clean latent, (1, C, H, W), as the passes will get it.
            noise_row: Its noise, same shape.
            t_row: Its timestep, (1,).
            cond_row: Its caption conditioning, one row (tensor or ``Conditioning``).
            rows: The rows to cut into passes.

        Returns:
            Rows per pass, in [1, rows].
        """
        key = (tuple(x0_row.shape[1:]), tuple(cond_row.shape[1:]), x0_row.dtype)
        if key not in self._row_bytes:
            # plain copies: tensors made under a host's inference_mode cannot be saved for backward
            with torch.inference_mode(False), eval_mode(self.unet):
                x0_row, noise_row, t_row, cond_row = (t.clone() for t in (x0_row, noise_row, t_row, cond_row))
                self._row_bytes[key] = saved_bytes(lambda: forward_rows(
                    self.unet, x0_row, noise_row, t_row, cond_row, self.alphas, self.autocast_dtype))
        return rows_per_pass(memory_budget(self.device, self.max_memory), self._row_bytes[key], rows)

    def _noise(self, keys: list[str], timesteps: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([noise_for(self.settings.noise_seed, k, t, shape) for k in keys for t in timesteps])

    def features(self, x0: torch.Tensor, cond: torch.Tensor | Conditioning, keys: list[str]) -> torch.Tensor:
        """phi (n, k) = P^T gbar_z (float32; float64 for a float64 UNet), gbar_z the (optionally unit-normalised) LoRA gradients
        averaged over T_K. P is linear, so each row is projected first and normalised after, by the
        norm of its unprojected gradient. Works when called under no_grad or inference_mode, as hosts
        do (ComfyUI runs nodes under inference_mode; diffusers pipelines under no_grad).

        See docs/method.md §8.

        Args:
            x0: Clean latents x_0, (n, C, H, W), on any device.
            cond: Caption conditioning c: (n, tokens, dim) text states, or an SDXL ``Conditioning`` of n rows.
            keys: Sample keys, n of them; they fix the noise (docs/method.md §4).

        Returns:
            phi, (n, k) float32 (float64 for a float64 UNet), on the UNet's device.
        """
        return features_together([self], x0, cond, keys)[0]

    def _rows_key(self) -> tuple:
        """Featurizers with equal keys feed the UNet the same rows (and may share a forward pass)."""
        return (id(self.unet), tuple(self.timesteps), self.settings.noise_seed, self.autocast_dtype,
                self.prediction_type)

    def _finish(self, projected: torch.Tensor, sq_norm: torch.Tensor, n: int) -> torch.Tensor:
        if self.settings.normalize:
            projected = projected / sq_norm.sqrt().clamp_min(1e-30).unsqueeze(1)
        return projected.view(n, len(self.timesteps), -1).mean(dim=1)

    @torch.no_grad()
    def residuals(self, x0: torch.Tensor, cond: torch.Tensor | Conditioning, keys: list[str], chunk: int = 25) -> torch.Tensor:
        """e (n,): residual weights, per docs/method.md §9 and ``settings.residual``.

        Args:
            x0: Clean latents x_0, (n, C, H, W).
            cond: Caption conditioning c: (n, tokens, dim) text states, or an SDXL ``Conditioning`` of n rows.
            keys: Sample keys, n of them; they fix the noise.
            chunk: Timesteps of the T_E grid per forward pass (n * chunk rows at a time).

        Returns:
            e, (n,) float32 on the CPU; all ones when ``settings.residual`` is "none".

        Raises:
            ValueError: For the "signed" form, which only ``features_and_residuals`` computes.
        """
        n = len(keys)
        if self.settings.residual == "none":
            return torch.ones(n)
        if self.settings.residual == "signed":
            raise ValueError("residual form 'signed' comes from the featurizing backward: use features_and_residuals")
        grid = self.settings.residual_grid(self.num_train_timesteps)
        x0 = x0.to(self.device, torch.float32)
        cond = cond.to(self.device)
        r = torch.zeros(n, len(grid))
        with eval_mode(self.unet):
            for start in range(0, len(grid), chunk):
                ts = grid[start:start + chunk]
                m = len(ts)
                noise = self._noise(keys, ts, tuple(x0.shape[1:])).to(self.device)
                rows_t = torch.tensor(ts, device=self.device).repeat(n)
                rows_x0 = x0.repeat_interleave(m, dim=0)
                rows_cond = cond.repeat_interleave(m, dim=0)
                # no backward here, so a row holds less than in ``features``: that budget is an upper bound
                step = self.rows_per_pass(rows_x0[:1], noise[:1], rows_t[:1], rows_cond[:1], n * m)
                err = torch.cat([self._residual_rows(rows_x0[s:s + step], noise[s:s + step], rows_t[s:s + step],
                                                     rows_cond[s:s + step]) for s in range(0, n * m, step)])
                r[:, start:start + m] = err.view(n, m).cpu()
        return self.residual_weights(r)

    def residual_weights(self, r: torch.Tensor) -> torch.Tensor:
        """e from the residual norms r_t of each sample, in the form ``settings.residual`` names.

        Args:
            r: (n, T_E) residual norms, one column per timestep of ``settings.residual_grid``.

        Returns:
            e, (n,) float32 on the CPU (docs/method.md §9).
        """
        r = r.float().cpu()
        if self.settings.residual == "magnitude":
            return r.mean(dim=1)
        return (r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)).mean(dim=1)

    def _residual_rows(self, rows_x0: torch.Tensor, noise: torch.Tensor, rows_t: torch.Tensor,
                       rows_cond: torch.Tensor | Conditioning) -> torch.Tensor:
        """||eps_theta(x_t) - target||_rms per row, (rows,) float32 (docs/method.md §9)."""
        xt = noisy_latents(rows_x0, noise, rows_t, self.alphas)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            pred = self.unet(xt.to(self.unet.dtype), rows_t, **unet_kwargs(rows_cond, self.unet.dtype)).sample
        return residual_norms(pred, training_target(self.prediction_type, rows_x0, noise, rows_t, self.alphas))


def features_together(featurizers: list[Featurizer], x0: torch.Tensor, cond: torch.Tensor | Conditioning,
                      keys: list[str]) -> list[torch.Tensor]:
    """``featurizer.features(x0, cond, keys)`` for each featurizer, with one forward pass per group
    of featurizers that feed the UNet the same rows (same model, timesteps, noise seed, autocast): a
    store's das, dtrak and trak sets differ only in f and normalisation, so they share the forward
    and take one backward each.

    Args:
        featurizers: The featurizers, e.g. one per feature set of a store.
        x0: Clean latents x_0, (n, C, H, W).
        cond: Caption conditioning c: (n, tokens, dim) text states, or an SDXL ``Conditioning`` of n rows.
        keys: Sample keys, n of them; they fix the noise.

    Returns:
        phi of each featurizer, in order: (n, k) each (see ``Featurizer.features``).
    """
    return features_and_residuals(featurizers, x0, cond, keys, residuals=False)[0]


def features_and_residuals(featurizers: list[Featurizer], x0: torch.Tensor, cond: torch.Tensor | Conditioning, keys: list[str],
                           residuals: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Features of every featurizer as ``features_together`` computes them, and their residual
    weights: those of settings that share the featurizing forward (``residual_timesteps`` 0) from
    that forward's predictions, no extra UNet pass; the others from ``Featurizer.residuals``. The
    signed residual form (docs/method.md §9) takes one more backward of the same forward and gives a
    vector per sample: u = (1/K) sum_t P^T J_t^T r_t / D, each row divided by its f gradient's norm
    when the settings normalise.

    Args:
        featurizers: The featurizers, e.g. one per feature set of a store.
        x0: Clean latents x_0, (n, C, H, W).
        cond: Caption conditioning c: (n, tokens, dim) text states, or an SDXL ``Conditioning`` of n rows.
        keys: Sample keys, n of them; they fix the noise.
        residuals: Compute the residual weights too (False: features only, the second list all None).

    Returns:
        (phi of each featurizer, (n, k) each; e of each featurizer, on the CPU: (n,) float32, (n, k)
        u for the signed form (phi's dtype), or None without ``residuals``).
    """
    groups: dict[tuple, list[int]] = {}
    for i, featurizer in enumerate(featurizers):
        groups.setdefault(featurizer._rows_key(), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(featurizers)
    weights: list[torch.Tensor | None] = [None] * len(featurizers)
    n = len(keys)
    for members in groups.values():
        first = featurizers[members[0]]
        k = len(first.timesteps)
        errors: list[torch.Tensor] | None = [] if residuals and any(
            featurizers[i].settings.shares_forward and featurizers[i].settings.residual != "signed"
            for i in members) else None
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(first.unet):
            # tensors made under inference_mode cannot enter autograd: take plain copies
            x0_rows = x0.clone().to(first.device, accumulation_dtype(first.unet.dtype))
            rows_x0 = x0_rows.repeat_interleave(k, dim=0)
            rows_cond = cond.clone().to(first.device).repeat_interleave(k, dim=0)
            rows_t = torch.tensor(first.timesteps, device=first.device).repeat(n)
            noise = first._noise(keys, first.timesteps, tuple(x0_rows.shape[1:])).to(first.device, x0_rows.dtype)
            heads = [(featurizers[i].settings.output, featurizers[i].projector) for i in members]
            # the signed residual form: one more backward, of <prediction, stopgrad(r)> (docs/method.md §9)
            signed = {i: len(heads) + j for j, i in enumerate(
                i for i in members if residuals and featurizers[i].settings.residual == "signed")}
            heads += [(RESIDUAL_HEAD, featurizers[i].projector) for i in signed]
            step = first.rows_per_pass(rows_x0[:1], noise[:1], rows_t[:1], rows_cond[:1], n * k)
            passes = [projected_row_gradients(first.unet, heads, rows_x0[s:s + step], noise[s:s + step],
                                              rows_t[s:s + step], rows_cond[s:s + step], first.alphas,
                                              first.autocast_dtype, first.prediction_type, errors)
                      for s in range(0, n * k, step)]
            results = [(torch.cat([p[h][0] for p in passes]), torch.cat([p[h][1] for p in passes]))
                       for h in range(len(heads))]
        for i, (projected, sq_norm) in zip(members, results):
            out[i] = featurizers[i]._finish(projected, sq_norm, n)
            if i in signed:
                # each row's residual gradient divided by the norm of that row's f gradient, as phi's rows are
                weights[i] = featurizers[i]._finish(results[signed[i]][0], sq_norm, n).cpu()
            elif residuals and featurizers[i].settings.shares_forward:
                weights[i] = featurizers[i].residual_weights(torch.cat(errors).view(n, k))
    if residuals:
        for i, featurizer in enumerate(featurizers):
            if weights[i] is None:
                weights[i] = featurizer.residuals(x0, cond, keys)
    return out, weights
