"""Per-step time and optimizer memory of K-FAC against Adam on the three models of tests/test_models.py.

For each model (a ResNet with batch norm, an LSTM classifier, a tiny transformer with tied
embeddings) both optimizers take the same full-batch steps; the median step time (forward,
backward, optimizer step) and the bytes held in the optimizer's state (K-FAC: factors, inverses,
momentum; Adam: moments) are written side by side, with their ratios, to
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


def measure(case: str, optimizer: str, steps: int) -> dict[str, float]:
    """Median step time (ms) and state memory (MiB) of one optimizer on one model."""
    model_fn, data_fn, hyper, _, _ = CASES[case]
    model = model_fn()
    x, y = data_fn()
    opt = (
        KFAC(model, inverse_update_steps=1, **hyper)
        if optimizer == "kfac"
        else torch.optim.Adam(model.parameters(), 1e-2)
    )
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times[3:]), "state_mib": state_bytes(opt) / 2**20}


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Measure every model with both optimizers and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "model_step_cost")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # near-zero losses make denormal floats, 100x slower on CPUs
    results = {case: {opt: measure(case, opt, args.steps) for opt in ("adam", "kfac")} for case in CASES}
    command = "python benchmarks/model_step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{command.strip()}`, cpu ({torch.get_num_threads()} threads), median of {args.steps} "
        "full-batch steps (K-FAC factors and inverses refreshed every step).",
        "",
        "| model | Adam ms/step | K-FAC ms/step | time ratio | Adam state MiB | K-FAC state MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, r in results.items():
        a, k = r["adam"], r["kfac"]
        lines.append(
            f"| {case} | {a['ms']:.1f} | {k['ms']:.1f} | {k['ms'] / a['ms']:.2f} | "
            f"{a['state_mib']:.3f} | {k['state_mib']:.3f} |"
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
