"""``fastdp-train``: a real DP training run.

Today it trains on scikit-learn's digits (1,797 8x8 images shipped inside scikit-learn, so it runs on any
machine without downloads): a small GroupNorm CNN, Poisson sampling, DP-SGD calibrated to the target epsilon.
The paper presets (CIFAR-10 WRNs, SmoothNets, NFNets) land with the models issue.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastdp
from fastdp.data import PoissonSampler, micro_batches


def digits_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes),
    )  # fmt: skip


def load_digits(seed: int) -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        sys.exit("fastdp-train: the digits dataset ships with scikit-learn; install it: pip install scikit-learn")
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastdp-train", description=__doc__.splitlines()[0])
    p.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (default 8)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epochs", type=float, default=40.0)
    p.add_argument("--batch-size", type=int, default=256, help="expected logical batch size (Poisson)")
    p.add_argument("--max-physical-batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.epsilon > 0:
        sys.exit(f"fastdp-train: --epsilon must be > 0, got {args.epsilon}")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    n = len(y_train)
    if not 0 < args.batch_size <= n:
        sys.exit(f"fastdp-train: --batch-size must be in [1, {n}] (the training set size), got {args.batch_size}")
    q = args.batch_size / n
    steps = max(1, round(args.epochs / q))
    model = digits_cnn()
    opt = fastdp.DPSGD(
        model, lr=args.lr, momentum=args.momentum, max_grad_norm=args.max_grad_norm,
        expected_batch_size=args.batch_size, sample_size=n, target_epsilon=args.epsilon, target_delta=args.delta,
        steps=steps, seed=args.seed,
    )  # fmt: skip
    sampler = PoissonSampler(n, sample_rate=q, steps=steps, seed=args.seed)
    print(f"digits: {n} train / {len(y_test)} test, {steps} steps of expected batch {args.batch_size}, "
          f"sigma={opt.noise_multiplier:.3f} for ({args.epsilon}, {args.delta})-DP")  # fmt: skip
    start = time.perf_counter()
    for step, idx in enumerate(sampler, 1):
        for xb, yb in micro_batches(x_train[idx], y_train[idx], max_physical_batch=args.max_physical_batch):
            F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:5d}/{steps}  test acc {accuracy(model, x_test, y_test):.3f}  "
                  f"eps {opt.epsilon(args.delta):.2f}")  # fmt: skip
    summary = {
        "test_accuracy": accuracy(model, x_test, y_test),
        "epsilon": opt.epsilon(args.delta),
        "delta": args.delta,
        "steps": steps,
        "noise_multiplier": opt.noise_multiplier,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))
    return summary


def cli() -> None:
    """Console entry point (``fastdp-train``): exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli()
