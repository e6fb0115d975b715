"""The machine's limits: memory bandwidth (a large-tensor copy) and fp32 matmul throughput,
and the decode roofline they give for a model at a batch size."""
from __future__ import annotations

import time

import torch


def copy_bandwidth(mb: int, repeats: int = 10) -> dict:
    """GB/s of `dst.copy_(src)` on an mb-MiB fp32 tensor, counting bytes read plus bytes written
    (2 x size per copy). Best of `repeats`: the least disturbed copy."""
    n = mb * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)  # first touch of the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return {"tensor_mib": mb, "gb_per_s": round(2 * n * 4 / best / 1e9, 2), "threads": torch.get_num_threads()}


def matmul_flops(n: int, repeats: int = 5) -> dict:
    """GFLOP/s of an n x n fp32 matmul (2 n^3 flops), best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "gflop_per_s": round(2 * n**3 / best / 1e9, 2), "threads": torch.get_num_threads()}


def decode_roofline(gb_per_s: float, gflop_per_s: float, weight_bytes: int, params: int, batch: int) -> dict:
    """Tokens/s ceiling of decoding at `batch` rows: each step streams the weights once
    (bandwidth-bound: bandwidth / weight bytes steps per second, `batch` tokens each), and each
    token costs about 2 x params flops (compute-bound). The lower bound wins. Attention over the
    KV cache, sampling and framework overhead are not in it, so real decoding sits below."""
    bw = gb_per_s * 1e9 / weight_bytes * batch
    fl = gflop_per_s * 1e9 / (2 * params)
    return {"batch": batch, "weight_gb": round(weight_bytes / 1e9, 3), "params": params,
            "bandwidth_bound_tok_s": round(bw, 1), "compute_bound_tok_s": round(fl, 1),
            "roofline_tok_s": round(min(bw, fl), 1), "bound": "bandwidth" if bw < fl else "compute"}
