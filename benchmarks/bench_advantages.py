"""Time every registered advantage estimator on one RL batch: 512 groups x 64 responses (32,768 rows) by default.

Usage (from the repository root)::

    python benchmarks/bench_advantages.py [--groups 512] [--size 64] [--repeats 21] [--warmup 3] [--threads N]

Rows are shuffled (groups are not contiguous), rewards are a 0/1 outcome plus 0.1 x a dense score in [0, 1], and
sequence scores are mean log-probs in [-3, 0]. Each estimator runs ``--warmup`` times, then ``--repeats`` timed
rounds run every estimator once each (round-robin, so load from other processes falls on all alike); the table gives
the median and the min, and the median's ratio to GRPO's.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lampo.advantages import ADVANTAGE_ESTIMATORS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=512)
    ap.add_argument("--size", type=int, default=64, help="responses per group")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 leaves torch's default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    n = args.groups * args.size
    group_index = torch.randperm(n, generator=gen) % args.groups  # (N,) shuffled, non-contiguous groups
    rewards = torch.bernoulli(torch.full((n,), 0.4), generator=gen) + 0.1 * torch.rand(n, generator=gen)
    seq_logprob = -3 * torch.rand(n, generator=gen)

    print(f"{args.groups} groups x {args.size} = {n} rows; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    for fn in ADVANTAGE_ESTIMATORS.values():
        for _ in range(args.warmup):
            fn(rewards, group_index, seq_logprob=seq_logprob)
    # round-robin: each repeat runs every estimator once, so a noisy neighbour hits all of them alike
    timings: dict[str, list[float]] = {name: [] for name in ADVANTAGE_ESTIMATORS}
    for _ in range(args.repeats):
        for name, fn in ADVANTAGE_ESTIMATORS.items():
            t0 = time.perf_counter()
            fn(rewards, group_index, seq_logprob=seq_logprob)
            timings[name].append(time.perf_counter() - t0)

    base = statistics.median(timings["grpo"]) if "grpo" in timings else None
    print(f"{'estimator':<10} {'median ms':>10} {'min ms':>8} {'x grpo':>7}")
    for name, runs in timings.items():
        med = statistics.median(runs)
        ratio = f"{med / base:7.2f}" if base else "      -"
        print(f"{name:<10} {med * 1e3:10.2f} {min(runs) * 1e3:8.2f} {ratio}")
    print(f"load average {os.getloadavg()[0]:.1f} at end (the CPU may be shared: compare min as well as median)")


if __name__ == "__main__":
    main()
