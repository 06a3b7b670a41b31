"""Damped inverses of Kronecker factors: which method is fastest at which size, and how accurate.

For symmetric positive semi-definite factors M (running averages of batch second moments with a
decaying spectrum, trace(M)/n = 1, rank below n where the batch is smaller than n) and the shift
s = sqrt(1e-3) of factored damping at the default damping, it times:

* cholesky: `cholesky_ex(M + s I)` then `cholesky_inverse` (the library's `damped_inverse`);
* lu: `torch.linalg.inv(M + s I)`;
* eigh: `torch.linalg.eigh(M)` alone (what inverse_method='eigh' computes; the damping is applied
  later, at preconditioning time);
* batched cholesky: the same for k factors of one size stacked into one call, per factor;
* the autoencoder's factor set (every A and G of its 8 Linear layers, as one inverse update
  refreshes them): one `damped_inverse` call per factor against `grouped_inverses`, which stacks
  the equal-sized factors (6 pairs) into one batched call per size;
* Newton-Schulz, warm-started: X <- X (2 I - (M + s I) X) from the previous inverse, the one of the
  factor before `folds` more EMA folds (1: factors and inverses refreshed at the same interval;
  10: factors every step, inverses every 10); iterated until the relative residual
  ||I - (M + s I) X||_F / sqrt(n) is below `--tolerance`, or reported as not converging.

Accuracy is the relative Frobenius error of the inverse against a float64 Cholesky inverse. The
methods take turns, repetition by repetition, so machine load hits them alike; medians are quoted.

Run from the repository root: ``python benchmarks/inverse_methods.py`` (a few minutes on 2 CPU
cores); ``--device cuda`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    AUTOENCODER_DIMS,
    RESULTS_DIR,
    Clock,
    command_line,
    environment,
    machine_line,
    median,
    resolve_device,
    write_results,
)
from torch import Tensor

from torch_kfac.linalg import damped_inverse

#: Factor sizes of the benchmark models (autoencoder 31..1001 with a bias column, convnet, LM).
SIZES = (31, 65, 129, 251, 513, 785, 1001)
QUICK_SIZES = (31, 65)
SHIFT = 1e-3**0.5
DECAY = 0.95
#: Number of equal-sized factors stacked in the batched Cholesky.
BATCH = 4


def factor_stream(n: int, batch: int, seed: int, device: torch.device) -> Callable[[], Tensor]:
    """Batch second moments of rows with a power-law covariance spectrum (i^-1.5), in float64."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    scales = torch.arange(1, n + 1, dtype=torch.float64).pow(-0.75)
    scales = scales / scales.square().mean().sqrt()  # trace / n = 1

    def draw() -> Tensor:
        rows = torch.randn(batch, n, generator=gen, dtype=torch.float64) * scales @ basis.T
        return (rows.T @ rows / batch).to(device)

    return draw


def running_factor(draw: Callable[[], Tensor], folds: int, start: Tensor | None = None) -> Tensor:
    """A zero-debiased EMA of `folds` batch moments (continuing from `start`, a debiased average)."""
    ema, weight = (torch.zeros_like(draw()), 0.0) if start is None else (start.clone(), 1.0)
    for _ in range(folds):
        ema.lerp_(draw(), 1.0 - DECAY)
        weight = weight * DECAY + 1.0 - DECAY
    return ema / weight


def damped(matrix: Tensor) -> Tensor:
    """M + s I."""
    return matrix + SHIFT * torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def cholesky_inverse(matrix: Tensor) -> Tensor:
    """(M + s I)^-1 through a Cholesky factorisation."""
    return torch.cholesky_inverse(torch.linalg.cholesky_ex(damped(matrix))[0])


def newton_schulz(matrix: Tensor, start: Tensor, tolerance: float, max_iters: int = 30) -> tuple[Tensor, int]:
    """Newton-Schulz iterations from `start` until the relative residual is below `tolerance`.

    Returns the last iterate and the number of iterations (-1: not converged in `max_iters`).
    """
    target = damped(matrix)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    x = start
    for k in range(max_iters + 1):
        residual = eye - target @ x
        if float(torch.linalg.matrix_norm(residual)) / matrix.shape[-1] ** 0.5 < tolerance:
            return x, k
        if not math.isfinite(float(residual.abs().max())):
            break
        x = x @ (eye + residual)
    return x, -1


def relative_error(got: Tensor, exact: Tensor) -> float:
    """||got - exact||_F / ||exact||_F, in float64."""
    return float(torch.linalg.matrix_norm(got.double() - exact) / torch.linalg.matrix_norm(exact))


def timed(fn: Callable[[], Any], clock: Clock) -> float:
    """Milliseconds of one call."""
    start = clock()
    fn()
    return (clock() - start) * 1e3


def measure_size(
    n: int, dtype: torch.dtype, device: torch.device, reps: int, tolerance: float, examples: int
) -> dict[str, Any]:
    """Times (median ms) and errors of every method for factors of size n."""
    clock = Clock(device)
    draws = [factor_stream(n, examples, seed, device) for seed in range(BATCH)]
    olds = [running_factor(draw, 40) for draw in draws]
    news = {
        folds: [running_factor(draw, folds, old) for draw, old in zip(draws, olds, strict=True)]
        for folds in (1, 10)
    }
    matrix = news[1][0].to(dtype)
    stacked = torch.stack(news[1]).to(dtype)
    exact = cholesky_inverse(news[1][0])
    methods: dict[str, Callable[[], Any]] = {
        "cholesky": lambda: cholesky_inverse(matrix),
        "lu": lambda: torch.linalg.inv(damped(matrix)),
        "eigh": lambda: torch.linalg.eigh(matrix),
        "cholesky_batched": lambda: cholesky_inverse(stacked),
        "matmul": lambda: matrix @ matrix,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    reps = min(8 * reps, max(reps, reps * 513 // n))  # small sizes: more repetitions against noise
    for _ in range(reps):
        for name, fn in methods.items():
            times[name].append(timed(fn, clock))
    record: dict[str, Any] = {"n": n, "dtype": str(dtype).removeprefix("torch."), "reps": reps}
    record.update({f"{name}_ms": median(t) for name, t in times.items()})
    record["cholesky_batched_ms"] /= BATCH  # per factor
    eigvals = torch.linalg.eigvalsh(damped(news[1][0]))
    record["condition"] = float(eigvals[-1] / eigvals[0])
    record["cholesky_error"] = relative_error(cholesky_inverse(matrix), exact)
    record["lu_error"] = relative_error(torch.linalg.inv(damped(matrix)), exact)
    vals, vecs = torch.linalg.eigh(matrix)
    record["eigh_error"] = relative_error((vecs / (vals.clamp(min=0) + SHIFT)) @ vecs.mT, exact)
    for folds in (1, 10):
        target = news[folds][0].to(dtype)
        start = cholesky_inverse(olds[0].to(dtype))
        result, iters = newton_schulz(target, start, tolerance)
        ns_times = []
        if iters >= 0:
            for _ in range(reps):
                ns_times.append(timed(lambda t=target, s=start, k=iters: newton_schulz_fixed(t, s, k), clock))
        record[f"newton_schulz_{folds}_iters"] = iters
        record[f"newton_schulz_{folds}_ms"] = median(ns_times)
        record[f"newton_schulz_{folds}_error"] = (
            relative_error(result, cholesky_inverse(news[folds][0])) if iters >= 0 else math.nan
        )
    return record


def factor_set_sizes(dims: tuple[int, ...]) -> list[int]:
    """The factor sizes of a Linear stack: A (d_in + 1, with the bias) and G (d_out) per layer."""
    return [d + 1 for d in dims[:-1]] + list(dims[1:])


def grouped_inverses(factors: list[Tensor], shift: Tensor) -> list[Tensor]:
    """`damped_inverse` of every factor, one batched call per group of equal size."""
    groups: dict[int, list[int]] = {}
    for i, factor in enumerate(factors):
        groups.setdefault(factor.shape[-1], []).append(i)
    inverses = list(factors)
    for members in groups.values():
        for i, inverse in zip(
            members, damped_inverse(torch.stack([factors[i] for i in members]), shift), strict=True
        ):
            inverses[i] = inverse
    return inverses


def measure_factor_set(
    sizes: list[int], dtype: torch.dtype, device: torch.device, reps: int, examples: int
) -> dict[str, Any]:
    """Median ms of inverting a whole set of factors: one call per factor, or grouped by size."""
    clock = Clock(device)
    factors = [
        running_factor(factor_stream(n, examples, i, device), 20).to(dtype) for i, n in enumerate(sizes)
    ]
    shift = torch.tensor(SHIFT, dtype=dtype, device=device)
    methods: dict[str, Callable[[], Any]] = {
        "per_factor": lambda: [damped_inverse(f, shift) for f in factors],
        "grouped": lambda: grouped_inverses(factors, shift),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            times[name].append(timed(fn, clock))
    pairs = zip(methods["per_factor"](), methods["grouped"](), strict=True)
    record: dict[str, Any] = {"sizes": sizes, "dtype": str(dtype).removeprefix("torch."), "reps": reps}
    record.update({f"{name}_ms": median(t) for name, t in times.items()})
    record["speedup"] = record["per_factor_ms"] / record["grouped_ms"]
    # Batched and single LAPACK calls may block the factorisation differently: rounding apart.
    record["max_difference"] = max(relative_error(b, a.double()) for a, b in pairs)
    return record


def newton_schulz_fixed(matrix: Tensor, start: Tensor, iters: int) -> Tensor:
    """`iters` Newton-Schulz iterations without a convergence check (what a tuned solver would run)."""
    target = damped(matrix)
    two = 2 * torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    x = start
    for _ in range(iters):
        x = x @ (two - target @ x)
    return x


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown report."""
    lines = [
        "# Damped inverses of Kronecker factors",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(result["environment"]),
        "",
        f"Factors: EMA (decay {DECAY}) of second moments of {result['examples']} rows with a power-law "
        f"spectrum, trace/n = 1; shift s = sqrt(1e-3); condition number of M + s I in the table. Times: "
        f"median ms of {result['reps']} or more (small sizes) interleaved repetitions; batched Cholesky: "
        f"{BATCH} equal-sized factors in one call, per factor. Newton-Schulz: warm-started from the "
        "inverse before 1 or 10 "
        f"more EMA folds, iterations to a relative residual below {result['tolerance']:g} (-1: it does "
        "not converge). Errors: relative Frobenius error against a float64 Cholesky inverse.",
        "",
        "| n | dtype | cond | matmul | cholesky | batched cholesky | lu | eigh | NS 1 fold (iters) | "
        "NS 10 folds (iters) | err cholesky | err eigh | err NS 1 fold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        ns = [
            f"{r[f'newton_schulz_{f}_ms']:.3g} ({r[f'newton_schulz_{f}_iters']})"
            if r[f"newton_schulz_{f}_iters"] >= 0
            else "diverges"
            for f in (1, 10)
        ]
        lines.append(
            f"| {r['n']} | {r['dtype']} | {r['condition']:.2g} | {r['matmul_ms']:.3g} | "
            f"{r['cholesky_ms']:.3g} | {r['cholesky_batched_ms']:.3g} | {r['lu_ms']:.3g} | "
            f"{r['eigh_ms']:.3g} | {ns[0]} | {ns[1]} | "
            f"{r['cholesky_error']:.1e} | {r['eigh_error']:.1e} | {r['newton_schulz_1_error']:.1e} |"
        )
    for r in result.get("factor_sets", []):
        lines += [
            "",
            f"Autoencoder factor set ({len(r['sizes'])} factors: {', '.join(map(str, r['sizes']))}), "
            f"{r['dtype']}, median of {r['reps']} interleaved repetitions: one `damped_inverse` per factor "
            f"{r['per_factor_ms']:.3g} ms, `grouped_inverses` (equal sizes batched) "
            f"{r['grouped_ms']:.3g} ms: {r['speedup']:.2f}x; largest relative Frobenius difference of "
            f"the inverses {r['max_difference']:.1e}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--examples", type=int, default=1000, help="rows per batch moment")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="two small sizes, for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="inverse_methods", help="file name of the results (without suffix)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    env = environment(device)
    records = []
    for n in sizes:
        for name in args.dtypes:
            records.append(
                measure_size(n, getattr(torch, name), device, args.reps, args.tolerance, args.examples)
            )
            print(json.dumps(records[-1]), flush=True)
    dims = (8, 16, 8, 16) if args.quick else AUTOENCODER_DIMS
    factor_sets = []
    for name in args.dtypes:
        factor_sets.append(
            measure_factor_set(factor_set_sizes(dims), getattr(torch, name), device, args.reps, args.examples)
        )
        print(json.dumps(factor_sets[-1]), flush=True)
    env["load_average_at_end"] = list(os.getloadavg())
    result = {
        "command": command_line(__file__, argv),
        "environment": env,
        "reps": args.reps,
        "tolerance": args.tolerance,
        "examples": args.examples,
        "records": records,
        "factor_sets": factor_sets,
    }
    write_results(args.out, args.name, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
