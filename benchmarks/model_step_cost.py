"""Per-step time and optimizer memory of K-FAC against Adam on the three models of tests/test_models.py.

For each model (a ResNet with batch norm, an LSTM classifier, a tiny transformer with tied
embeddings) the optimizers take the same full-batch steps after an untimed warm-up longer than
K-FAC's curvature warm-up: Adam, K-FAC as the model tests run it (inverses refreshed every step)
and K-FAC with the library's default intervals. The mean step time (forward, backward, optimizer
step; amortized over whole update cycles) and the bytes held in the optimizer's state (K-FAC:
factors, inverses, momentum; Adam: moments) are written side by side, with their ratios, to
`benchmarks/results/model_step_cost.{json,md}`.

    python benchmarks/model_step_cost.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import KFAC_DEFAULTS

from tests.test_models import CASES
from torch_kfac import KFAC

RESULTS = Path(__file__).resolve().parent / "results"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state."""
    total = 0
    for entry in opt.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


#: Untimed steps: past K-FAC's curvature warm-up (every-step refreshes), plus a few.
WARMUP = KFAC_DEFAULTS["warmup_steps"] + 3
OPTIMIZERS = ("adam", "kfac", "kfac-defaults")


def measure(case: str, optimizer: str, steps: int) -> dict[str, float]:
    """Mean and median step time (ms) and state memory (MiB) of one optimizer on one model."""
    model_fn, data_fn, hyper, _ = CASES[case]
    model = model_fn()
    x, y = data_fn()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    else:
        opt = KFAC(model, **({"inverse_update_steps": 1} if optimizer == "kfac" else {}), **hyper)
    times = []
    for _ in range(WARMUP + steps):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    timed = times[WARMUP:]
    return {
        "ms": 1e3 * statistics.fmean(timed),
        "median_ms": 1e3 * statistics.median(timed),
        "state_mib": state_bytes(opt) / 2**20,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Measure every model with both optimizers and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "model_step_cost")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # near-zero losses make denormal floats, 100x slower on CPUs
    results = {case: {opt: measure(case, opt, args.steps) for opt in OPTIMIZERS} for case in CASES}
    command = "python benchmarks/model_step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{command.strip()}`, cpu ({torch.get_num_threads()} threads), mean of {args.steps} "
        f"full-batch steps after {WARMUP} untimed ones. 'K-FAC (tests)': the model tests' settings, "
        "inverses refreshed every step; 'K-FAC (defaults)': the same with the library's default "
        "intervals (factors and inverses every 10 steps; the LSTM's settings record factors every step).",
        "",
        "| model | Adam ms/step | K-FAC (tests) ms/step | ratio | K-FAC (defaults) ms/step | ratio "
        "| Adam state MiB | K-FAC state MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, r in results.items():
        a, k, d = r["adam"], r["kfac"], r["kfac-defaults"]
        lines.append(
            f"| {case} | {a['ms']:.1f} | {k['ms']:.1f} | {k['ms'] / a['ms']:.2f} | {d['ms']:.1f} | "
            f"{d['ms'] / a['ms']:.2f} | {a['state_mib']:.3f} | {k['state_mib']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command.strip(), "results": results}, indent=2)
    )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
