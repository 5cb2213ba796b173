"""LDS as a function of the ridge lambda (docs/method.md §15): every kernel method's LDS over the rho
grid, on the tune queries (which choose rho) and on the reported ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..score import ranking
from .lds_settings import LDSSettings
from .lds_stats import lds

if TYPE_CHECKING:
    from ..attribute import Attributor


def lambda_curves(attributor: Attributor, parts: list[tuple], masks: np.ndarray, methods: list[str],
                  settings: LDSSettings) -> dict:
    """For every kernel method: LDS over the rho grid on the tune queries (pooled over the query
    sets) and on the reported ones, and the rho with the best tune LDS.

    Args:
        attributor: The attributor of the store; its kernels are solved again at each rho.
        parts: Per query set, ``(tune features or None, tune outputs (M, Q_t) or None, reported features,
            reported outputs (M, Q_r), set name)``; features as from ``Attributor.query_features``.
        masks: (M, N) bool subset masks.
        methods: Methods to evaluate; those without a kernel are skipped.
        settings: Gives ``rho_grid`` and ``bootstrap``.

    Returns:
        Per kernel method, ``{"points": [{"rho", "lambda", "tune": pooled tune LDS (nan without tune
        queries), "report": {set name: ``lds`` summary}}], "chosen_rho": best tune rho, or None}``.
    """
    from ..registry import method
    from ..score import LambdaRule, gram, index_in_memory, raw_scores, train_array

    kernel_methods = [m for m in methods if method(m).kernel]
    kernels = {fs: gram(attributor.store, fs) for fs in {method(m).feature_set for m in kernel_methods}}
    curves: dict[str, dict] = {m: {"points": []} for m in kernel_methods}
    for rho in settings.rho_grid:
        solved = {fs: index_in_memory(attributor.store, fs, LambdaRule(rho=rho), kernel)
                  for fs, kernel in kernels.items()}
        for name in kernel_methods:
            fs = method(name).feature_set
            info, arrays = solved[fs]
            psi = arrays[train_array(name)[1]]
            tune_values, point = [], {"rho": rho, "lambda": info["lambda"], "report": {}}
            for t_feat, t_out, r_feat, r_out, set_name in parts:
                if t_feat is not None:
                    tune = lds(ranking(name, raw_scores(t_feat[fs], psi)).double().numpy(), masks, t_out, 10)
                    tune_values += [v for v in tune["per_query"] if not np.isnan(v)]
                point["report"][set_name] = lds(ranking(name, raw_scores(r_feat[fs], psi)).double().numpy(),
                                                masks, r_out, settings.bootstrap)
            point["tune"] = float(np.mean(tune_values)) if tune_values else float("nan")
            curves[name]["points"].append(point)
    for name, curve in curves.items():
        tuned = [p for p in curve["points"] if not np.isnan(p["tune"])]
        curve["chosen_rho"] = max(tuned, key=lambda p: p["tune"])["rho"] if tuned else None
    return curves
