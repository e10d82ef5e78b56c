"""Adapter popularity in a batch: which adapter each request (and each token) uses.

The four workloads are the ones Punica named (see shared/research/anchors.md); the group sizes
below are our own definitions, deterministic so that a batch's byte count is reproducible:

    distinct   every request its own adapter (U = n requests)
    uniform    ceil(sqrt(n)) adapters, equally popular (group sizes differ by at most one)
    skewed     Zipf popularity: the k-th most popular adapter gets a share of the requests
               proportional to k^-ZIPF_EXPONENT (largest-remainder rounding; adapters whose share
               rounds to zero requests are absent)
    identical  one adapter for all requests (U = 1)

A request is one row at decode and ``seq`` consecutive rows (its prompt) at prefill. Requests are
placed in the batch in a seeded random order, so rows of one adapter are not contiguous (the
kernels must do the grouping).
"""
from __future__ import annotations

import math
from typing import List

import torch

WORKLOADS = ("distinct", "uniform", "skewed", "identical")
ZIPF_EXPONENT = 1.5


def group_sizes(workload: str, n_requests: int) -> List[int]:
    """Requests per adapter, most popular first; sums to ``n_requests``."""
    n = int(n_requests)
    if n < 1:
        raise ValueError(f"n_requests: expected >= 1, got {n_requests!r}")
    if workload == "distinct":
        return [1] * n
    if workload == "identical":
        return [n]
    if workload == "uniform":
        u = math.ceil(math.sqrt(n))
        return [n // u + (1 if k < n % u else 0) for k in range(u)]
    if workload == "skewed":
        weights = [k ** -ZIPF_EXPONENT for k in range(1, n + 1)]
        total = sum(weights)
        exact = [n * w / total for w in weights]
        sizes = [int(e) for e in exact]
        order = sorted(range(n), key=lambda k: (-(exact[k] - sizes[k]), k))
        for k in order[: n - sum(sizes)]:
            sizes[k] += 1
        sizes = sorted((s for s in sizes if s > 0), reverse=True)
        return sizes
    raise ValueError(f"workload: unknown workload {workload!r}; expected one of {WORKLOADS}")


def request_slots(workload: str, n_requests: int, *, seed: int = 0) -> torch.Tensor:
    """[n_requests] int64: the adapter slot (0..U-1) of each request, in a seeded random order."""
    sizes = group_sizes(workload, n_requests)
    slots = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    gen = torch.Generator().manual_seed(seed)
    return slots[torch.randperm(len(slots), generator=gen)]


def token_slots(workload: str, n_requests: int, seq: int = 1, *, seed: int = 0) -> torch.Tensor:
    """[n_requests * seq] int64 slot per row: each request's ``seq`` rows are consecutive."""
    return torch.repeat_interleave(request_slots(workload, n_requests, seed=seed), int(seq))
