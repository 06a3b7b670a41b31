"""Host synchronisations in K-FAC steps on a GPU, found by `torch.cuda.set_sync_debug_mode('warn')`.

Each synchronising call in a step raises a warning naming it; the script counts them per step for
the autoencoder at the library's default intervals (steps past the warm-up: with and without an
inverse update). On the CPU `tests/test_host_reads.py` counts the host reads instead.

    python benchmarks/host_reads.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

import torch
from common import autoencoder, pixel_bce, resolve_device

from torch_kfac import KFAC


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("--device must be a CUDA device (on the CPU run tests/test_host_reads.py)")
    torch.manual_seed(0)
    model = autoencoder().to(device)
    opt = KFAC(model, lr=0.01, damping=1.0, norm_constraint=0.01)
    x = torch.rand(args.batch_size, 1, 28, 28, device=device)
    per_step = []
    for step in range(args.steps):
        opt.zero_grad()
        pixel_bce(model(x), x).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        per_step.append({"step": step, "syncs": len(syncs), "calls": sorted(set(syncs))})
        print(json.dumps(per_step[-1]), flush=True)
    return {"steps": per_step}


if __name__ == "__main__":
    main()
