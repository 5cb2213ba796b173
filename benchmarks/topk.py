"""Scoring at scale: streamed top-k over 1,000,000 x 2048 float16 (or int8) train-side vectors, against
the sequential read speed of the same files.

    python benchmarks/topk.py [--rows 1000000] [--dim 2048] [--dtype float16|int8] [--workdir /tmp/das-sd-topk]
                              [--no-verify]

Builds (once) a synthetic store: random psi rows (float16, or int8 with a float32 scale per row) in
index files of 65,536 rows, with a
manifest of 1M keys (no feature shards: the das method reads only the index). Then, each in a fresh
process so that peak memory is its own:
  read    plain sequential reads of the index files into one 64 MiB buffer (GB/s)
  query   das_sd.topk.stream_topk for 1 query and for a batch of 16 (GB/s of files scanned)
both with a warm page cache, and both again after dropping the page cache where the OS allows it.
Checks that the streamed top-10 equals in-memory scoring of the whole matrix (--no-verify skips it;
it needs about 2 x the float16 matrix in RAM). Writes benchmarks/results/topk.json (topk-int8.json).
Files are not checked against their manifest checksums here (DAS_SD_VERIFY_ON_READ=0): that check
reads every file once per process, which would warm the page cache before the cold rows; its cost is
one sequential read, the "read" row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes, reset_peak_rss, rss_bytes, run_worker, save_results  # noqa: E402

os.environ.setdefault("DAS_SD_VERIFY_ON_READ", "0")  # inherited by the workers; see the docstring

SHARD_ROWS = 65536


def build_store(root: Path, rows: int, dim: int, dtype: str = "float16"):
    from das_sd.score import LambdaRule, quantize_rows
    from das_sd.store import FeatureStore

    if (root / "manifest.json").is_file():
        store = FeatureStore.open(root)
        if len(store) == rows and store.index_info("das", ) and store.index_info("das")["k"] == dim:
            return store
        raise SystemExit(f"{root} holds another synthetic store; remove it or pass another --workdir")
    store = FeatureStore.create(root, {"synthetic": True, "dim": dim}, shard_size=SHARD_ROWS)
    for start in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - start)
        store.manifest["shards"].append({"file": f"features-{len(store.manifest['shards']):05d}.safetensors (absent)",
                                         "rows": n, "arrays": {}, "keys": [f"s{i:07d}" for i in range(start, start + n)],
                                         "paths": [""] * n, "captions": [""] * n})
    store.mark_complete()

    def shards():
        for start in range(0, rows, SHARD_ROWS):
            g = torch.Generator().manual_seed(start)
            n = min(SHARD_ROWS, rows - start)
            psi = torch.randn(n, dim, generator=g) * dim ** -0.5
            if dtype == "int8":
                vectors, scales = quantize_rows({"psi_das": psi})
                yield vectors | scales | {"norm.psi_das": psi.norm(dim=1)}
            else:
                psi = psi.half()
                yield {"psi_das": psi, "norm.psi_das": psi.float().norm(dim=1)}
    files = store.write_index_files("das", shards())
    store.record_index("das", files, {"feature_set": "das", "k": dim, "dtype": dtype, "synthetic": True,
                                      "lambda_rule": LambdaRule().describe()})
    return store


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    from das_sd.store import FeatureStore
    from das_sd.topk import stream_topk

    store = FeatureStore.open(spec["root"])
    files = list(store.iter_index("das"))
    # one-time costs of a fresh process (kernel dispatch, thread pools), not part of a query
    torch.randn(spec["queries"] or 1, spec["dim"]).half() @ torch.randn(4096, spec["dim"]).half().T
    size = sum(f.stat().st_size for f in files)
    reset_peak_rss()
    base = rss_bytes()
    start = time.perf_counter()
    if spec["mode"] == "read":
        buffer = bytearray(64 << 20)
        view = memoryview(buffer)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        out = {}
    else:
        q = torch.randn(spec["queries"], spec["dim"], generator=torch.Generator().manual_seed(7))
        top = stream_topk(store, "das", q, top_k=10)
        out = {"indices": top.indices.tolist(), "scores": top.scores.tolist()}
    seconds = time.perf_counter() - start
    return out | {"seconds": seconds, "bytes": size, "gb_per_s": size / seconds / 1e9,
                  "peak_extra_mb": (peak_rss_bytes() - base) / 2**20}


def verify(root: Path, streamed: dict, dim: int, queries: int) -> bool:
    """In-memory scoring of the whole matrix (float32 products, chunked only to bound the float32 copy)."""
    from das_sd.score import dequantize, ranking
    from das_sd.store import FeatureStore

    index = FeatureStore.open(root).load_index("das")
    n = len(index["psi_das"])
    q = torch.randn(queries, dim, generator=torch.Generator().manual_seed(7))

    def rows(i: int) -> torch.Tensor:  # float32 rows i .. i + 65536 (int8: times their scale)
        part = {k: index[k][i:i + 65536] for k in ("psi_das", "scale.psi_das") if k in index}
        return dequantize(part, "psi_das").float()
    score = torch.cat([ranking("das", q @ rows(i).T) for i in range(0, n, 65536)], 1)
    top = torch.topk(score, 10, dim=1)
    return top.indices.tolist() == streamed["indices"] and torch.allclose(
        top.values, torch.tensor(streamed["scores"]), rtol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--workdir", default="/tmp/das-sd-topk")
    parser.add_argument("--dtype", default="float16", choices=["float16", "int8"])
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    suffix = "" if args.dtype == "float16" else f"-{args.dtype}"
    root = Path(args.workdir) / f"store-{args.rows}x{args.dim}{suffix}"
    start = time.time()
    build_store(root, args.rows, args.dim, args.dtype)
    print(f"synthetic store {root}: {args.rows} x {args.dim} {args.dtype} ({time.time() - start:.0f} s to build or open)")
    script = Path(__file__).resolve()
    results = {}
    for cache in ("warm", "cold"):
        for mode, queries in (("read", 0), ("query", 1), ("query", 16)):
            if cache == "cold" and not drop_page_cache():
                break
            if cache == "warm":  # bring the files into the page cache first
                run_worker(script, {"root": str(root), "mode": "read", "dim": args.dim, "queries": 0})
            name = f"{cache}/{mode}" + (f"-{queries}" if queries else "")
            results[name] = run_worker(script, {"root": str(root), "mode": mode, "dim": args.dim, "queries": queries})
            r = results[name]
            print(f"{name:16s} {r['seconds']:7.2f} s  {r['gb_per_s']:6.2f} GB/s  peak +{r['peak_extra_mb']:7.1f} MB",
                  flush=True)
    ratios = {}
    for cache in ("warm", "cold"):
        for q in (1, 16):
            key = f"{cache}/query-{q}"
            if key in results and f"{cache}/read" in results:
                ratios[f"{cache} query({q}) / read"] = results[key]["gb_per_s"] / results[f"{cache}/read"]["gb_per_s"]
    print("ratios:", {k: round(v, 3) for k, v in ratios.items()})
    shard_mb = SHARD_ROWS * args.dim * (1 if args.dtype == "int8" else 2) / 2**20
    identical = None if args.no_verify else verify(root, results["warm/query-16"], args.dim, 16)
    print(f"one index file: {shard_mb:.0f} MB; streamed top-10 identical to in-memory scoring: {identical}")
    for r in results.values():
        r.pop("indices", None), r.pop("scores", None)
    path = save_results(f"topk{suffix}", {"rows": args.rows, "dim": args.dim, "dtype": args.dtype,
                                 "shard_rows": SHARD_ROWS, "shard_mb": shard_mb,
                                 "command": " ".join(sys.argv), "results": results, "ratios": ratios,
                                 "identical_to_in_memory": identical, "target": "query >= 0.5 x read speed"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
