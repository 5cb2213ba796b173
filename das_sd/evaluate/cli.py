"""`das-sd eval ...`: the evaluation commands (planted ground truth, LDS, counterfactuals, ablations)."""

from __future__ import annotations

import argparse
import json

from ..argtypes import method_list, positive_float_list, positive_int
from .jobs import QuerySources, StoreTarget, ablations_report, counterfactual_report, ground_truth_report, lds_report
from .lds_settings import LDSSettings


def _target(args: argparse.Namespace) -> StoreTarget:
    return StoreTarget(args.store, base=args.base, lora=args.lora, device=args.device)


def _sources(args: argparse.Namespace) -> QuerySources:
    return QuerySources(val=args.val, val_limit=args.val_limit, prompts=args.prompts, seeds=args.seeds)


def _lds_settings(args: argparse.Namespace) -> LDSSettings:
    return LDSSettings(subsets=args.subsets, repeats=args.repeats, output_timesteps=args.output_timesteps,
                       tune_fraction=args.tune_fraction, rho_grid=args.rho_grid or LDSSettings.rho_grid,
                       output_noise_draws=args.output_noise_draws)


def cmd_eval_groundtruth(args: argparse.Namespace) -> None:
    """``das-sd eval groundtruth``: Recall@k and mAP of the planted exemplar groups, per method.

    Args:
        args: the parsed command line.
    """
    report = ground_truth_report(_target(args), args.data, split=args.split, methods=args.methods)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"planted ground truth, {args.split} split: {report['queries']} generations, "
          f"{len(report['groups'])} groups, chance AP {report['chance_ap']:.3f}")
    print(f"{'method':16s} {'Recall@5':>9s} {'Recall@10':>10s} {'mAP':>7s}")
    for name, m in report["methods"].items():
        print(f"{name:16s} {m['recall@5']:9.3f} {m['recall@10']:10.3f} {m['ap']:7.3f}")


def cmd_eval_lds(args: argparse.Namespace) -> None:
    """``das-sd eval lds``: the Linear Datamodeling Score of each method, with its confidence interval.

    Args:
        args: the parsed command line.
    """
    results = lds_report(_target(args), args.workdir, _sources(args), _lds_settings(args), args.methods,
                         workers=args.workers, ray_address=args.ray)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, block in results["query_sets"].items():
        print(f"LDS ({name}, {block['queries']} reported queries, {block['tune_queries']} more held out for "
              f"lambda, M = {args.subsets} subsets):")
        for method_name, r in block["lds"].items():
            rho = results["lambda"].get(method_name, {}).get("chosen_rho")
            note = f"  (rho {rho:g})" if rho is not None else ""
            print(f"  {method_name:32s} {r['lds']:+.3f}  [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]{note}")


def cmd_eval_ablations(args: argparse.Namespace) -> None:
    """``das-sd eval ablations``: one option of das changed at a time, measured like the base store.

    Args:
        args: the parsed command line.
    """
    from .ablations import ablation_table

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    results = ablations_report(_target(args), args.workdir, variants, args.data, not args.no_groundtruth,
                               args.lds_workdir, _sources(args), _lds_settings(args), args.workers,
                               method_variants=not args.no_method_variants)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(ablation_table(results))


def cmd_eval_counterfactual(args: argparse.Namespace) -> None:
    """``das-sd eval counterfactual``: remove each method's top-k, retrain, regenerate, measure the change.

    Args:
        args: the parsed command line.
    """
    from .counterfactual import CounterfactualSettings

    settings = CounterfactualSettings(top_k=args.top_k, random_draws=args.random_draws)
    results = counterfactual_report(_target(args), args.workdir, args.prompts, args.seeds, settings, args.methods,
                                    workers=args.workers, ray_address=args.ray)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"counterfactual removal of the top-{args.top_k}, {results['generations']} generations "
          "(median distance of the regenerated image to the original; larger = the removed images mattered more):")
    print(f"  {'removed':32s} {'pixel RMS':>10s} {'latent L2':>10s}")
    for name, r in results["median"].items():
        print(f"  {name:32s} {r['pixel']:10.4f} {r['latent']:10.4f}")


def _store_flags(p: argparse.ArgumentParser) -> None:
    """Flags every evaluation shares: the store, its model overrides, the methods, JSON output."""
    p.add_argument("--store", required=True, help="feature store folder (featurized and indexed)")
    p.add_argument("--methods", type=method_list, default=None,
                   help="comma-separated methods (default: all the store supports)")
    p.add_argument("--json", action="store_true", help="print the full results as one JSON object")
    p.add_argument("--base", default=None, help="base model folder or checkpoint file, if it moved since featurizing")
    p.add_argument("--lora", default=None, help="LoRA file, if it moved since featurizing")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _retraining_flags(p: argparse.ArgumentParser, results: str) -> None:
    p.add_argument("--workdir", required=True, help=f"retrained LoRAs and {results} (cached: a rerun resumes)")
    p.add_argument("--workers", type=positive_int, default=1, help="retraining processes")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="retrain as tasks on a Ray cluster (no ADDRESS: a local one with --workers CPUs)")


def _lds_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val", default=None, help="dataset folder of held-out real images (val queries)")
    p.add_argument("--val-limit", type=positive_int, default=None, help="use only the first N val images")
    p.add_argument("--prompts", default=None, help="text file of prompts (gen queries, seeds 0..N-1)")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per prompt (with --prompts)")
    p.add_argument("--subsets", type=positive_int, default=LDSSettings.subsets, help="M (the papers use 64)")
    p.add_argument("--repeats", type=positive_int, default=LDSSettings.repeats,
                   help="LoRAs per subset (seeds), outputs averaged")
    p.add_argument("--tune-fraction", type=float, default=LDSSettings.tune_fraction,
                   help="share of each query set held out to choose lambda (never reported)")
    p.add_argument("--rho-grid", type=positive_float_list, default=None, help="comma-separated rho values for lambda = rho trace / min(N, k) "
                   f"(default {','.join(f'{rho:g}' for rho in LDSSettings.rho_grid)})")
    p.add_argument("--output-timesteps", type=positive_int, default=LDSSettings.output_timesteps,
                   help="timesteps of the uniform grid that the output L_simple is averaged over")
    p.add_argument("--output-noise-draws", type=positive_int, default=LDSSettings.output_noise_draws, help="noise draws per timestep of that average")


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``das-sd eval`` and its evaluations to the command line.

    Args:
        sub: the ``das-sd`` parser's subcommands.
    """
    p = sub.add_parser("eval", help="evaluate attribution methods (ground truth, LDS, counterfactuals, ablations)")
    evals = p.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    p = evals.add_parser("groundtruth", help="Recall@5/10 and mAP of planted exemplar groups, per method")
    _store_flags(p)
    p.add_argument("--data", default=None, help="dataset with ground_truth.json (default: the store's dataset)")
    p.add_argument("--split", default="test", choices=["test", "tune"], help="query split (choose settings on tune)")
    p.set_defaults(func=cmd_eval_groundtruth)

    p = evals.add_parser("lds", help="Linear Datamodeling Score: retrain on random half subsets, correlate")
    _store_flags(p)
    _retraining_flags(p, "outputs")
    _lds_flags(p)
    p.set_defaults(func=cmd_eval_lds)

    p = evals.add_parser("ablations", help="one option of das changed at a time: ground truth and LDS per variant")
    _store_flags(p)
    p.add_argument("--workdir", required=True, help="variant stores and ablations.json (cached: a rerun resumes)")
    p.add_argument("--variants", default=None, help="comma-separated, e.g. 'f=mean,K=50' (default: all of "
                   "f, normalisation, residual form, K, k that differ from the store's settings)")
    p.add_argument("--no-method-variants", action="store_true", help="skip leverage off and signed scores")
    p.add_argument("--data", default=None, help="dataset with ground_truth.json (default: the store's dataset)")
    p.add_argument("--no-groundtruth", action="store_true", help="skip the planted ground-truth evaluation")
    p.add_argument("--lds-workdir", default=None, help="LDS run folder (retrained LoRAs shared by all variants); "
                   "without it, no LDS")
    p.add_argument("--workers", type=positive_int, default=1, help="retraining processes")
    _lds_flags(p)
    p.set_defaults(func=cmd_eval_ablations)

    p = evals.add_parser("counterfactual", help="remove each method's top-k, retrain, regenerate, measure the change")
    _store_flags(p)
    _retraining_flags(p, "results")
    p.add_argument("--prompts", required=True, help="text file of prompts (generations with seeds 0..N-1)")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per prompt")
    p.add_argument("--top-k", type=positive_int, default=10, help="training images removed per method and generation")
    p.add_argument("--random-draws", type=positive_int, default=1, help="random-removal controls per generation")
    p.set_defaults(func=cmd_eval_counterfactual)
