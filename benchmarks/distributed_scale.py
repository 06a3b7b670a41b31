"""Distributed K-FAC on paper: step time and bytes per step for ResNet-50 and BERT-large at 8-1024 ranks.

A cost model per `grad_worker_fraction` strategy (see docs/distributed.md), from
* compute rates measured here (GEMM rate, Cholesky-inverse and eigh times scaled by n^3;
  `common.measure_rates`), or those rates times a stated GPU speed-up (`--gpu-speedup`);
* a stated network: bandwidth `--bandwidth` (bytes/s) and latency `--latency` (s); a ring
  all-reduce of n bytes over W ranks costs 2 (W-1)/W n / B + 2 log2(W) alpha, a broadcast to P
  ranks n / B + log2(P) alpha (pipelined).
Per rank and step (amortized over the factor and inverse intervals): forward/backward, the data-
parallel gradient all-reduce (what SGD pays too), the factor statistics and their all-reduce
(upper triangles), the inverses of the blocks the rank owns (greedy assignment, the library's own)
and their broadcasts, preconditioning its column's blocks, and the broadcast of preconditioned
gradients along its row.

Then a measured check on this machine: 2 and 4 gloo ranks train the CNN of
examples/distributed.py for each strategy; the bytes the library counts must equal the model's
prediction exactly, and the step time is compared with the model's (roughly: a loaded 2-core
machine). Also timed there: the factor all-reduce with and without the upper-triangle packing.

    python benchmarks/distributed_scale.py            # writes benchmarks/results/distributed_scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import RESULTS_DIR, command_line, environment, machine_line, measure_rates
from torch import nn

from torch_kfac import KFAC
from torch_kfac.distributed import greedy_assignment

BYTES = 4  # float32 factors, inverses and gradients
RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Layer:
    """A Kronecker block: A is d_in x d_in (bias column included), G d_out x d_out; `positions`
    weight-sharing positions per example (conv output locations, tokens)."""

    name: str
    d_in: int
    d_out: int
    positions: int


def resnet50_layers() -> list[Layer]:
    """The 53 convolutions and the classifier of ResNet-50 on 224x224 images (no conv biases)."""
    layers = [Layer("conv1", 3 * 49, 64, 112 * 112)]
    size, channels = 56, 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out_size = size // stride
            pre = f"layer{stage + 1}.{block}"
            layers.append(Layer(f"{pre}.conv1", channels, width, size * size))
            layers.append(Layer(f"{pre}.conv2", 9 * width, width, out_size * out_size))
            layers.append(Layer(f"{pre}.conv3", width, 4 * width, out_size * out_size))
            if block == 0:
                layers.append(Layer(f"{pre}.downsample", channels, 4 * width, out_size * out_size))
            channels, size = 4 * width, out_size
    layers.append(Layer("fc", 2048 + 1, 1000, 1))
    return layers


def bert_large_layers(seq: int = 128) -> list[Layer]:
    """24 encoder layers of width 1024: Q, K, V, output projection, 4096-wide MLP (biases on)."""
    layers = []
    for i in range(24):
        for proj in ("q", "k", "v", "out"):
            layers.append(Layer(f"{i}.{proj}", 1025, 1024, seq))
        layers += [Layer(f"{i}.mlp1", 1025, 4096, seq), Layer(f"{i}.mlp2", 4097, 1024, seq)]
    return layers


@dataclass(frozen=True)
class Costs:
    """Compute rates (measured or scaled) and the network."""

    flops: float
    chol_s_per_n3: float
    eigh_s_per_n3: float
    bandwidth: float
    latency: float

    def allreduce(self, nbytes: float, world: int) -> float:
        if world == 1 or nbytes == 0:
            return 0.0
        return 2 * (world - 1) / world * nbytes / self.bandwidth + 2 * math.log2(world) * self.latency

    def broadcast(self, nbytes: float, ranks: int) -> float:
        if ranks == 1 or nbytes == 0:
            return 0.0
        return nbytes / self.bandwidth + math.log2(ranks) * self.latency


def inverse_numel(layer: Layer, method: str) -> int:
    """Entries an inverse update writes (and broadcasts): inverses, or eigenvalues and vectors."""
    square = layer.d_in**2 + layer.d_out**2
    return square if method == "cholesky" else square + layer.d_in + layer.d_out


def plan(layers: list[Layer], world: int, fraction: float) -> dict[str, Any]:
    """Owners (the library's greedy assignment) and grid columns of every block."""
    costs = {layer.name: float(layer.d_in) ** 3 + float(layer.d_out) ** 3 for layer in layers}
    owners = greedy_assignment(costs, world)
    rows = max(1, round(fraction * world))
    columns = world // rows
    return {"owners": owners, "rows": rows, "columns": columns}


def factor_numel(layers: list[Layer], triangle: bool) -> int:
    """Entries of one factor all-reduce: upper triangles, or whole matrices."""
    if triangle:
        return sum(x.d_in * (x.d_in + 1) // 2 + x.d_out * (x.d_out + 1) // 2 for x in layers)
    return sum(x.d_in**2 + x.d_out**2 for x in layers)


def per_rank_bytes(
    layers: list[Layer],
    world: int,
    fraction: float,
    method: str,
    rank: int,
    intervals: tuple[int, int],
    triangle: bool = True,
) -> dict[str, float]:
    """Payload bytes per step that rank `rank` takes part in, as `DistributedCurvature.bytes` counts them."""
    factor_every, inverse_every = intervals
    grid = plan(layers, world, fraction)
    column = rank % grid["columns"]
    triangles = factor_numel(layers, triangle)
    mine = [layer for layer in layers if grid["owners"][layer.name] % grid["columns"] == column]
    inverses = sum(inverse_numel(layer, method) for layer in mine) if grid["rows"] > 1 else 0
    gradients = sum(layer.d_in * layer.d_out for layer in layers) if grid["columns"] > 1 else 0
    return {
        "factors": triangles * BYTES / factor_every,
        "inverses": inverses * BYTES / inverse_every,
        "gradients": float(gradients * BYTES),
    }


def predict(
    layers: list[Layer],
    world: int,
    fraction: float,
    costs: Costs,
    batch: int,
    method: str = "eigh",
    intervals: tuple[int, int] = (10, 100),
    triangle: bool = True,
    single: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Step time (s, amortized) and bytes per step of the slowest rank for one strategy.

    With `single` (a single rank's measured step, full inverse refresh and full preconditioning
    times), the compute phases are those measurements, the inverse and preconditioning parts cut
    to this rank's share; otherwise they are FLOP counts at the given rates.
    """
    factor_every, inverse_every = intervals
    grid = plan(layers, world, fraction)
    rows, columns = grid["rows"], grid["columns"]
    per_n3 = costs.chol_s_per_n3 if method == "cholesky" else costs.eigh_s_per_n3
    grad_numel = sum(layer.d_in * layer.d_out for layer in layers)
    fwd_bwd = sum(6 * batch * layer.positions * layer.d_in * layer.d_out for layer in layers) / costs.flops
    stats = (
        sum(2 * batch * layer.positions * (layer.d_in**2 + layer.d_out**2) for layer in layers) / costs.flops
    )
    triangles = factor_numel(layers, triangle)
    inverse_time = [0.0] * world
    for layer in layers:
        inverse_time[grid["owners"][layer.name]] += (layer.d_in**3 + layer.d_out**3) * per_n3
    column_of = {layer.name: grid["owners"][layer.name] % columns for layer in layers}
    grad_comm = 0.0
    if columns > 1:  # every row receives every column's preconditioned gradients
        column_numel = [0] * columns
        for layer in layers:
            column_numel[column_of[layer.name]] += layer.d_in * layer.d_out
        grad_comm = sum(costs.broadcast(n * BYTES, columns) for n in column_numel if n)
    worst: dict[str, Any] = {"time": -1.0}
    # Ranks differ only by column (and ownership); evaluate one rank per column, keep the slowest.
    for column in range(columns):
        mine = [layer for layer in layers if column_of[layer.name] == column]
        precondition = sum(2 * (x.d_out**2 * x.d_in + x.d_out * x.d_in**2) for x in mine) / costs.flops
        by_owner: dict[int, int] = {}
        for layer in mine:
            owner = grid["owners"][layer.name]
            by_owner[owner] = by_owner.get(owner, 0) + inverse_numel(layer, method)
        inverse_comm = sum(costs.broadcast(n * BYTES, rows) for n in by_owner.values())
        phases = {
            "forward_backward": fwd_bwd,
            "gradient_allreduce": costs.allreduce(grad_numel * BYTES, world),
            "statistics": stats / factor_every,
            "factor_allreduce": costs.allreduce(triangles * BYTES, world) / factor_every,
            "inverses": max(inverse_time[r] for r in range(column, world, columns)) / inverse_every,
            "inverse_broadcast": inverse_comm / inverse_every,
            "precondition": precondition,
            "gradient_broadcast": grad_comm,
        }
        if single is not None:
            total_inverse = sum(inverse_time)
            total_precondition = sum(2 * (x.d_out**2 * x.d_in + x.d_out * x.d_in**2) for x in layers)
            inverse_share = phases["inverses"] * inverse_every / total_inverse
            precondition_share = precondition * costs.flops / total_precondition
            rest = single["step_s"] - single["inverse_s"] / inverse_every - single["precondition_s"]
            phases.update(
                forward_backward=rest,
                statistics=0.0,
                inverses=single["inverse_s"] * inverse_share / inverse_every,
                precondition=single["precondition_s"] * precondition_share,
            )
        total = sum(phases.values())
        if total > worst["time"]:
            worst = {"time": total, "phases": phases, "column": column}
    nbytes = per_rank_bytes(layers, world, fraction, method, worst["column"], intervals, triangle)
    sgd = fwd_bwd + costs.allreduce(grad_numel * BYTES, world)
    column_memory = [0] * columns
    for layer in layers:
        column_memory[column_of[layer.name]] += inverse_numel(layer, method)
    inverse_memory = max(column_memory)
    return {
        "step_s": worst["time"],
        "sgd_step_s": sgd,
        "phases": worst["phases"],
        "kfac_bytes_per_step": sum(nbytes.values()),
        "bytes": nbytes,
        "gradient_allreduce_bytes": grad_numel * BYTES,
        "inverse_memory_bytes": inverse_memory * BYTES,
    }


# ------------------------------------------------------------------------------- measured check
def cnn_layers(model: nn.Module) -> list[Layer]:
    """The Kronecker blocks of examples/distributed.py's CNN, as the model sees them."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            d_in = module.weight[0].numel() + (module.bias is not None)
            layers.append(Layer(name, d_in, module.weight.shape[0], 1))
    return layers


def _check_worker(rank: int, world: int, folder: str, steps: int, intervals: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rv", rank=rank, world_size=world)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "example", Path(__file__).parents[1] / "examples" / "distributed.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out: dict[str, Any] = {}
    fractions = [1.0, 0.5] if world == 2 else [1.0, 0.5, 0.25]
    for fraction in fractions:
        torch.manual_seed(0)
        model = example.make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_kfac(ddp, intervals, fraction)
        counter = opt.preconditioner.distributed.bytes  # type: ignore[union-attr]
        times = []
        start_bytes: dict[str, int] = {}
        for step in range(steps):
            x, y = example.global_batch(step, 32 * world, torch.float32)
            x, y = x[rank * 32 : (rank + 1) * 32], y[rank * 32 : (rank + 1) * 32]
            if step == intervals[1]:  # after the first (everywhere) refresh: steady state
                start_bytes = dict(counter)
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        window = steps - intervals[1]
        out[fraction] = {
            "bytes_per_step": {k: (v - start_bytes.get(k, 0)) / window for k, v in counter.items()},
            "step_s": sorted(times[intervals[1] :])[window // 2],
        }
    # The factor all-reduce, full matrices against upper triangles (ResNet-50 stage-3 sized factors).
    from torch_kfac.distributed import DistributedCurvature

    stats = {(i, "A"): _spd(2304 if i % 2 else 256, i) for i in range(6)}
    for triangle in (False, True):
        comm = DistributedCurvature(1.0, reduce_upper_triangle=triangle)
        comm.average_statistics(stats)
        samples = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            comm.average_statistics(stats)
            samples.append(time.perf_counter() - t0)
        out[f"allreduce_{'triangle' if triangle else 'full'}_s"] = sorted(samples)[2]
    out["allreduce_bytes_full"] = sum(t.numel() for t in stats.values()) * BYTES
    # Network: a 16 MiB all-reduce and a 4-byte one.
    big, small = torch.zeros(4 * 2**20), torch.zeros(1)
    for name, tensor in (("bandwidth", big), ("latency", small)):
        samples = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - t0)
        out[f"allreduce_{name}_s"] = sorted(samples)[2]
    if rank == 0:
        torch.save(out, Path(folder) / "measured.pt")
    dist.destroy_process_group()


def make_kfac(model: nn.Module, intervals: tuple[int, int], fraction: float = 1.0) -> KFAC:
    """The K-FAC configuration of the measured check."""
    return KFAC(
        model,
        lr=0.02,
        damping=3e-2,
        inverse_method="eigh",
        warmup_steps=0,
        factor_update_steps=intervals[0],
        inverse_update_steps=intervals[1],
        grad_worker_fraction=fraction,
    )


def single_rank_costs(example: Any, steps: int, intervals: tuple[int, int]) -> dict[str, float]:
    """One process, 32 images: median step, a full inverse refresh and a full preconditioning."""
    torch.manual_seed(0)
    model = example.make_model()
    opt = make_kfac(model, intervals)
    times = []
    for step in range(steps):
        x, y = example.global_batch(step, 32, torch.float32)
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    pre = opt.preconditioner
    mats = pre.gradient_matrices()
    inverse, precondition = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        pre.update_inverses(force=True)
        inverse.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pre.precondition_all(mats)
        precondition.append(time.perf_counter() - t0)
    return {
        "step_s": sorted(times[intervals[1] :])[(steps - intervals[1]) // 2],
        "inverse_s": sorted(inverse)[2],
        "precondition_s": sorted(precondition)[2],
    }


def _spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    return (x @ x.T / n).unsqueeze(0)


def measured_check(costs: Costs, steps: int, intervals: tuple[int, int]) -> dict[str, Any]:
    """2 and 4 gloo ranks: counted bytes against the model, step time against the model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "example", Path(__file__).parents[1] / "examples" / "distributed.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    layers = cnn_layers(example.make_model())
    single = single_rank_costs(example, 3 * intervals[1], intervals)
    result: dict[str, Any] = {"single_rank": single}
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_check_worker, args=(world, folder, steps, intervals), nprocs=world, join=True)
            measured = torch.load(Path(folder) / "measured.pt", weights_only=False)
        link = Costs(
            costs.flops,
            costs.chol_s_per_n3,
            costs.eigh_s_per_n3,
            bandwidth=(2 * (world - 1) / world * 16 * 2**20) / max(measured["allreduce_bandwidth_s"], 1e-9),
            latency=measured["allreduce_latency_s"] / max(2 * math.log2(world), 1),
        )
        rows = {}
        for fraction in [f for f in measured if isinstance(f, float)]:
            model = predict(
                layers, world, fraction, link, 32, "eigh", intervals, triangle=False, single=single
            )
            predicted = per_rank_bytes(layers, world, fraction, "eigh", 0, intervals, triangle=False)
            counted = measured[fraction]["bytes_per_step"]
            rows[fraction] = {
                "counted_bytes_per_step": {k: v for k, v in counted.items() if k != "scalars"},
                "predicted_bytes_per_step": predicted,
                "bytes_equal": all(abs(counted.get(k, 0.0) - v) < 1e-6 for k, v in predicted.items()),
                "measured_step_s": measured[fraction]["step_s"],
                "predicted_step_s": model["step_s"],
            }
        result[world] = {
            "strategies": rows,
            "allreduce_full_s": measured["allreduce_full_s"],
            "allreduce_triangle_s": measured["allreduce_triangle_s"],
            "allreduce_bytes_full": measured["allreduce_bytes_full"],
            "link_bandwidth": link.bandwidth,
            "link_latency": link.latency,
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, default=25e9, help="bytes/s per rank (200 Gb/s IB)")
    parser.add_argument("--latency", type=float, default=5e-6, help="seconds per message hop")
    parser.add_argument(
        "--gpu-speedup",
        type=float,
        default=0.0,
        help="compute rates x this (0: 60 TFLOP/s GEMM, eigh 10x less efficient)",
    )
    parser.add_argument("--steps", type=int, default=12, help="steps per strategy in the measured check")
    parser.add_argument("--quick", action="store_true", help="skip the measured gloo check")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    env = environment(device)
    rates = measure_rates(device, ref_n=512 if args.quick else 1024)
    n3 = rates.cholesky_ref_n**3
    cpu = Costs(
        rates.matmul_flops, rates.cholesky_inverse_s / n3, rates.eigh_s / n3, args.bandwidth, args.latency
    )
    speed = args.gpu_speedup or 60e12 / rates.matmul_flops
    gpu = Costs(
        cpu.flops * speed,
        cpu.chol_s_per_n3 / speed * 10,
        cpu.eigh_s_per_n3 / speed * 10,
        args.bandwidth,
        args.latency,
    )
    models = {
        "resnet50": (resnet50_layers(), 32, "ResNet-50, 224x224, 32 images per rank"),
        "bert_large": (bert_large_layers(), 8, "BERT-large encoder, 128 tokens, 8 sequences per rank"),
    }
    table = []
    for model, (layers, batch, _) in models.items():
        for profile, costs in (("measured cpu", cpu), ("gpu (stated)", gpu)):
            for world in RANKS if profile != "measured cpu" else (8, 64, 1024):
                for label, fraction in (("f=1", 1.0), ("f=1/8", 1 / 8), ("f=1/W", 1 / world)):
                    pred = predict(layers, world, fraction, costs, batch)
                    table.append(
                        {"model": model, "profile": profile, "world": world, "strategy": label, **pred}
                    )
    result: dict[str, Any] = {
        "command": command_line(__file__, argv),
        "environment": env,
        "rates": {"gemm_flops": rates.matmul_flops, "cholesky_inverse_s": rates.cholesky_inverse_s,
                  "eigh_s": rates.eigh_s, "ref_n": rates.cholesky_ref_n, "gpu_speedup": speed},
        "network": {"bandwidth": args.bandwidth, "latency": args.latency},
        "predictions": table,
    }  # fmt: skip
    if not args.quick:
        result["measured"] = measured_check(cpu, args.steps, (2, 4))
    env["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed_scale.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "distributed_scale.md").write_text(report(result, models))
    return result


def report(result: dict[str, Any], models: dict[str, Any]) -> str:
    """The markdown summary."""
    rates, net = result["rates"], result["network"]
    lines = [
        "# Distributed K-FAC: scale model",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(result["environment"]),
        "",
        f"Measured here (1 thread): GEMM {rates['gemm_flops'] / 1e9:.0f} GFLOP/s, Cholesky inverse at "
        f"n={rates['ref_n']}: {rates['cholesky_inverse_s'] * 1e3:.1f} ms, "
        f"eigh: {rates['eigh_s'] * 1e3:.1f} ms "
        f"(both scaled by n^3). 'gpu (stated)' multiplies the GEMM rate by {rates['gpu_speedup']:.0f} "
        "(60 TFLOP/s, an assumption, not a measurement) and the factorizations by a tenth of that. "
        "Network (stated): "
        f"{net['bandwidth'] / 1e9:.0f} GB/s per rank, {net['latency'] * 1e6:.0f} us per hop.",
        "",
        "K-FAC with eigendecompositions, factors every 10 steps, inverses every 100; step times amortized, "
        "of the slowest rank. 'bytes/step' is K-FAC's own traffic per rank (payload of the collectives it "
        "takes part in); the gradient all-reduce (DDP's, which SGD pays too) is listed apart. 'x SGD' is the "
        "step time over data-parallel SGD's (forward/backward plus gradient all-reduce).",
        "",
    ]
    for model, (_, _, title) in models.items():
        rows = [r for r in result["predictions"] if r["model"] == model]
        lines += [
            f"## {title}",
            "",
            f"Gradient all-reduce payload: {rows[0]['gradient_allreduce_bytes'] / 2**20:.0f} MiB.",
            "",
        ]
        lines += [
            "| profile | ranks | strategy | step ms | x SGD | K-FAC MiB/step | inverse MiB/rank |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['profile']} | {r['world']} | {r['strategy']} | {r['step_s'] * 1e3:.1f} | "
                f"{r['step_s'] / r['sgd_step_s']:.2f} | {r['kfac_bytes_per_step'] / 2**20:.1f} | "
                f"{r['inverse_memory_bytes'] / 2**20:.0f} |"
            )
        lines.append("")
    measured = result.get("measured")
    if measured:
        lines += [
            "## Measured check (gloo on this machine, examples/distributed.py's CNN, 32 images per rank, "
            "factors every 2 steps, inverses every 4)",
            "",
            "| ranks | strategy | counted bytes/step | predicted | equal | measured step ms | predicted ms |",
            "|---:|---|---|---|---|---:|---:|",
        ]
        for world, entry in measured.items():
            if world == "single_rank":
                continue
            for fraction, row in entry["strategies"].items():
                counted = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row["counted_bytes_per_step"].items()))
                predicted = ", ".join(
                    f"{k} {v:.0f}" for k, v in sorted(row["predicted_bytes_per_step"].items()) if v
                )
                lines.append(
                    f"| {world} | f={fraction} | {counted} | {predicted} | {row['bytes_equal']} | "
                    f"{row['measured_step_s'] * 1e3:.1f} | {row['predicted_step_s'] * 1e3:.1f} |"
                )
        single = measured["single_rank"]
        lines += [
            "",
            f"Predicted times use the single-rank measurements (step {single['step_s'] * 1e3:.1f} ms, full "
            f"inverse refresh {single['inverse_s'] * 1e3:.1f} ms, full preconditioning "
            f"{single['precondition_s'] * 1e3:.1f} ms), the inverse and preconditioning parts cut to the "
            "rank's share, plus the communication at the gloo bandwidth and latency measured in the same "
            "run. On CPUs the factors travel as whole matrices (the default there). The machine has 2 "
            "cores for all ranks (4 ranks share them) and was shared with other jobs (load average above), "
            "so measured times are upper bounds of a rank-per-core run.",
            "",
            "Factor all-reduce (six factors, three 2304x2304 and three 256x256, float32):",
            "",
        ]
        for world, entry in measured.items():
            if world == "single_rank":
                continue
            lines.append(
                f"- {world} ranks: full matrices {entry['allreduce_full_s'] * 1e3:.1f} ms, upper triangles "
                f"{entry['allreduce_triangle_s'] * 1e3:.1f} ms (half the bytes, plus the packing)."
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
