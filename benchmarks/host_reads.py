"""Host reads (CPU) or host synchronisations (GPU) per K-FAC step, by step kind and configuration.

On the CPU `torch_kfac.utils.HostReads` records every host read of a tensor in `opt.step()` (each
would be a full synchronisation on a GPU); on a GPU `torch.cuda.set_sync_debug_mode('warn')` names
every synchronising call. The autoencoder trains at the library's default intervals (warm-up 20,
factors and inverses every 10 steps) for 30 steps; the steps are grouped into inverse-update steps
(the warm-up and every 10th) and plain steps. Configurations: KFAC and KFACPreconditioner (in front
of SGD) at fixed hyperparameters, and KFAC's adaptive options.

    python benchmarks/host_reads.py --device cpu
    python benchmarks/host_reads.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    KFAC_DEFAULTS,
    RESULTS_DIR,
    PixelBCELoss,
    autoencoder,
    command_line,
    environment,
    machine_line,
    pixel_bce,
    resolve_device,
    write_results,
)

from torch_kfac import KFAC, KFACPreconditioner
from torch_kfac.utils import HostReads

#: name -> (KFACPreconditioner in front of SGD?, options)
CONFIGS: dict[str, tuple[bool, dict[str, Any]]] = {
    "KFAC": (False, {}),
    "KFAC momentum 0.9": (False, {"momentum": 0.9}),
    "KFACPreconditioner + SGD": (True, {}),
    "KFAC host_check_interval=1": (False, {"host_check_interval": 1}),
    "KFAC adapt_damping": (False, {"adapt_damping": True, "damping_adaptation_interval": 1}),
    "KFAC adaptive lr and momentum": (False, {"adaptive_learning_rate": True, "adaptive_momentum": True}),
    "KFAC reject_steps + adapt_damping": (False, {"reject_steps": True, "adapt_damping": True}),
}


def counter(device: torch.device) -> Callable[[Callable[[], object]], list[str]]:
    """The host reads (CPU) or synchronisations (GPU) of one call, as 'what (where)' strings."""

    def on_cpu(call: Callable[[], object]) -> list[str]:
        with HostReads() as mode:
            call()
        return [f"{what} ({where})" for what, where in mode.reads]

    def on_gpu(call: Callable[[], object]) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]

    return on_gpu if device.type == "cuda" else on_cpu


def run_config(
    preconditioner: bool, options: dict[str, Any], device: torch.device, batch_size: int, steps: int
) -> list[list[str]]:
    """The reads of each step of one configuration."""
    torch.manual_seed(0)
    model = autoencoder().to(device)
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    count = counter(device)
    adaptive = bool(options.get("adaptive_learning_rate") or options.get("reject_steps"))
    # The adaptive options evaluate the loss module on the batch: the summed loss, reduction='sum'.
    kwargs = {**options, "loss_fn": PixelBCELoss(), "reduction": "sum"} if adaptive else options
    loss_fn = PixelBCELoss() if adaptive else pixel_bce
    if preconditioner:
        pre = KFACPreconditioner(model, damping=1.0, **kwargs)
        sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        opt = KFAC(model, lr=None if kwargs.get("adaptive_learning_rate") else 0.01, damping=1.0, **kwargs)
    per_step = []
    for _ in range(steps):
        model.zero_grad()
        loss = loss_fn(model(x), x)
        loss.backward()
        if preconditioner:
            per_step.append(count(pre.step))
            sgd.step()
        else:
            batch = (x, x) if adaptive else None
            per_step.append(count(lambda loss=loss, batch=batch: opt.step(loss=loss, batch=batch)))
    return per_step


def inverse_step(step: int) -> bool:
    """Whether `step` refreshes the inverses at the library's default schedule."""
    return step < KFAC_DEFAULTS["warmup_steps"] or step % KFAC_DEFAULTS["inverse_update_steps"] == 0


def summarize(per_step: list[list[str]]) -> dict[str, Any]:
    """Reads per step kind: the range of counts and the distinct calls."""
    out: dict[str, Any] = {}
    for kind, wanted in (("inverse_update", True), ("plain", False)):
        steps = [reads for i, reads in enumerate(per_step) if inverse_step(i) == wanted]
        counts = [len(r) for r in steps]
        out[kind] = {
            "steps": len(steps),
            "min": min(counts, default=0),
            "max": max(counts, default=0),
            "calls": sorted({c for r in steps for c in r}),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    unit = "synchronisations" if result["environment"]["device"].startswith("cuda") else "host reads"
    lines = [
        f"# Host reads per K-FAC step ({unit})",
        "",
        f"`{result['command']}`",
        "",
        machine_line(result["environment"]),
        "",
        f"Autoencoder, batch {result['batch_size']}, {result['steps']} steps at the default intervals "
        "(warm-up 20, inverses every 10): counts per step (min-max) by step kind.",
        "",
        "| configuration | inverse-update steps | plain steps | where |",
        "|---|---|---|---|",
    ]
    for name, summary in result["configs"].items():
        cells = [f"{s['min']}" + (f"-{s['max']}" if s["max"] > s["min"] else "") for s in summary.values()]
        calls = ", ".join(f"`{c}`" for c in sorted({c for s in summary.values() for c in s["calls"]}))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {calls or '-'} |")
    if not result["environment"]["device"].startswith("cuda"):
        lines += [
            "",
            "`lowrank.py:verified_rows` is the probe of low-rank preconditioning (`low_rank_gradients`), "
            "read in every step on the CPU only, where a read costs nothing; on a GPU a step without a host "
            "check takes the dense product and reads nothing (`tests/test_host_reads.py`).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 1000 on a GPU, 100 on a CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="host_reads", help="file name of the results (without suffix)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    batch_size = args.batch_size or (1000 if device.type == "cuda" else 100)
    env = environment(device)
    configs = {}
    for name in args.configs:
        preconditioner, options = CONFIGS[name]
        configs[name] = summarize(run_config(preconditioner, options, device, batch_size, args.steps))
        print(json.dumps({name: configs[name]}), flush=True)
    env["load_average_at_end"] = list(os.getloadavg())
    result = {
        "command": command_line(__file__, argv),
        "environment": env,
        "batch_size": batch_size,
        "steps": args.steps,
        "configs": configs,
    }
    write_results(args.out, args.name, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
