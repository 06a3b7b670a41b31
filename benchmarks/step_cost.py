"""Cost of one K-FAC step, phase by phase, next to Adam, SGD and other K-FAC libraries.

For each model and batch size, every optimizer trains its own copy of the same network on one fixed
batch; the optimizers take turns, one update cycle (lcm of the K-FAC intervals) at a time, so that
load on a shared machine hits them alike. K-FAC's phases are timed in situ by wrapping the
preconditioner's and blocks' methods on the instance (the library is not modified):

* forward+backward: the pass itself, statistics capture excluded;
* factor update: statistics capture (`block.record_inputs`/`record_output_grad` in the hooks) and
  the EMA fold (`KFACPreconditioner._fold`, which `step` calls after its finiteness check);
* inverse update: `KFACPreconditioner._refresh_inverses` on the steps where inverses are due;
* preconditioning: `KFACPreconditioner.precondition` over all blocks;
* update: the rest of `KFAC.step` (gradient matrices, finiteness check, momentum, apply).

Each phase is compared with its floor: its FLOP count (torch's FlopCounterMode) at the GEMM rate
measured in the same run, the Cholesky-inverse time measured at a reference size scaled by n^3, or,
for element-wise phases, the minimum bytes moved at the measured memory bandwidth.

With ``--compile BACKEND`` every K-FAC variant is also timed with ``compile_step=BACKEND`` (its
preconditioning and update as one compiled function), side by side with the eager one ('x eager':
the median of the cycle-by-cycle ratios); 'warm-up s' is the untimed warm-up, which includes the
compilation.

Run from the repository root: ``python benchmarks/step_cost.py`` (about 10 minutes on 2 CPU cores).
On a GPU, against SGD, Adam and KAISA (kfac-pytorch, recorded as failed when not installed) at the
intervals (1, 10) and (10, 100), the autoencoder at batch 1000 (and 250) and ResNet-18 at 256::

    python benchmarks/step_cost.py --device cuda --models autoencoder resnet18 \
        --optimizers kfac sgd adam kaisa --intervals 1:10 10:100 --name step_cost_cuda
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    KFAC_DEFAULTS,
    RESULTS_DIR,
    Clock,
    MachineRates,
    TinyTransformerLM,
    Trainer,
    autoencoder,
    best_rates,
    class_ce,
    command_line,
    convnet,
    environment,
    machine_line,
    make_trainer,
    measure_rates,
    median,
    pixel_bce,
    qmodel_options,
    resnet18,
    resolve_device,
    seeded,
    synthetic_images,
    token_ce,
    write_results,
)
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from torch_kfac import KFAC

#: Machine rates measured between update cycles during the whole run.
RATE_SAMPLES: list[MachineRates] = []

PHASES = ("forward_backward", "capture", "fold", "inverse", "precondition", "update")
PHASE_LABELS = {
    "forward_backward": "forward+backward",
    "capture": "factor update: statistics capture",
    "fold": "factor update: EMA fold",
    "inverse": "inverse update",
    "precondition": "preconditioning",
    "update": "update (momentum, apply, checks)",
}


@dataclass
class ModelSpec:
    """A benchmark model: builder, loss, batch maker and K-FAC hyperparameters."""

    name: str
    build: Callable[[], nn.Module]
    loss_fn: Callable[..., Tensor]
    batch: Callable[[int, torch.device], tuple[Tensor, Tensor]]
    batch_sizes: list[int]
    description: str
    kfac: dict[str, Any] = field(default_factory=dict)


def image_batch(n: int, device: torch.device, labels: bool) -> tuple[Tensor, Tensor]:
    """A batch of synthetic 28x28 images with their labels, or themselves as targets."""
    x, y = synthetic_images(n, seed=1)
    return x.to(device), (y if labels else x).to(device)


def cifar_batch(n: int, side: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random RGB images and labels (the step cost does not depend on the pixels)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, side, side, generator=gen)
    return x.to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def model_specs(quick: bool) -> dict[str, ModelSpec]:
    """The models benchmarked, full size or tiny (--quick)."""
    dims = (784, 64, 32, 8, 32, 64, 784) if quick else (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
    channels = (4, 8, 8) if quick else (16, 32, 64)
    lm = {"vocab": 32, "width": 32, "depth": 1, "heads": 2, "context": 16} if quick else {}
    lm_full = {"vocab": 64, "width": 128, "depth": 2, "heads": 4, "context": 64}
    lm_cfg = lm or lm_full

    def tokens(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(1)
        seq = torch.randint(0, lm_cfg["vocab"], (n, lm_cfg["context"] + 1), generator=gen)
        return seq[:, :-1].to(device), seq[:, 1:].to(device)

    hidden = 16 if quick else 128
    return {
        "mlp": ModelSpec(
            "mlp",
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)),
            class_ce,
            lambda n, d: image_batch(n, d, labels=True),
            [8] if quick else [128],
            f"784-{hidden}-10 ReLU MLP, cross-entropy",
        ),
        "autoencoder": ModelSpec(
            "autoencoder",
            lambda: autoencoder(dims),
            pixel_bce,
            lambda n, d: image_batch(n, d, labels=False),
            [8] if quick else [250, 1000],
            "-".join(map(str, dims)) + " tanh autoencoder, sigmoid cross-entropy summed over pixels",
        ),
        "convnet": ModelSpec(
            "convnet",
            lambda: convnet(channels),
            class_ce,
            lambda n, d: image_batch(n, d, labels=True),
            [8] if quick else [128, 512],
            f"3 x (Conv2d 3x3 + ReLU + MaxPool) with {channels} channels, Linear-ReLU-Linear, 28x28 input",
        ),
        "resnet18": ModelSpec(
            "resnet18",
            lambda: resnet18((4, 8, 8, 8) if quick else (64, 128, 256, 512)),
            class_ce,
            lambda n, d: cifar_batch(n, 8 if quick else 32, d),
            [4] if quick else [256],
            "ResNet-18 (CIFAR stem) on synthetic "
            + ("8x8" if quick else "32x32")
            + " RGB images, 10 classes"
            + (" (widths 4-8)" if quick else ""),
        ),
        "transformer": ModelSpec(
            "transformer",
            lambda: TinyTransformerLM(**lm_cfg),
            token_ce,
            tokens,
            [4] if quick else [16, 64],
            "causal LM (K-FAC blocks for Linear, Embedding, LayerNorm): vocab {vocab}, width {width}, "
            "{depth} blocks, {heads} heads, context {context}".format(**lm_cfg),
        ),
    }


# ------------------------------------------------------------------------------ instrumentation
class PhaseTimer:
    """Times K-FAC's phases by wrapping methods of one preconditioner and its blocks (on the instances)."""

    def __init__(self, optimizer: KFAC, clock: Clock) -> None:
        self.clock = clock
        self.acc = dict.fromkeys(("capture", "fold", "inverse", "precondition"), 0.0)
        pre = optimizer.preconditioner
        self._wrap(pre, "_fold", "fold")
        self._wrap(pre, "_refresh_inverses", "inverse")
        self._wrap(pre, "precondition", "precondition")
        for block in pre.blocks.values():
            for method in ("record_inputs", "record_output_grad"):
                if hasattr(block, method):
                    self._wrap(block, method, "capture")

    def _wrap(self, obj: object, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)
        clock, acc = self.clock, self.acc

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            out = fn(*args, **kwargs)
            acc[phase] += clock() - t0
            return out

        setattr(obj, attr, timed)

    def take(self) -> dict[str, float]:
        """Phase seconds accumulated since the last call; resets them."""
        out = dict(self.acc)
        for key in self.acc:
            self.acc[key] = 0.0
        return out


@dataclass
class Contender:
    """One optimizer in the comparison, with its per-step records."""

    label: str
    trainer: Trainer
    timer: PhaseTimer | None = None
    steps: list[dict[str, float]] = field(default_factory=list)
    warmup_s: float = 0.0

    def run_step(self, x: Tensor, y: Tensor, clock: Clock, record: bool) -> None:
        """Take one step, recording forward+backward, update and phase times."""
        t0 = clock()
        loss = self.trainer.forward_backward(x, y)
        t1 = clock()
        self.trainer.update(loss)
        t2 = clock()
        phases = self.timer.take() if self.timer else {}
        if record:
            self.steps.append({"fb": t1 - t0, "update": t2 - t1, "total": t2 - t0, **phases})
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{self.label}: loss became {float(loss.detach())}")


# ------------------------------------------------------------------------------------- floors
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls/convolutions/attention issued by `fn` (torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def kfac_costs(
    spec: ModelSpec, model0: nn.Module, x: Tensor, y: Tensor, hparams: dict[str, Any]
) -> dict[str, Any]:
    """FLOPs/bytes per call and floors of every K-FAC phase, from a fresh optimizer on a copy."""
    plain = copy.deepcopy(model0)

    def plain_fb() -> None:
        plain.zero_grad(set_to_none=True)
        spec.loss_fn(plain(x), y).backward()

    fb_flops = count_flops(plain_fb)
    model = copy.deepcopy(model0)
    opt = KFAC(model, **hparams)
    pre = opt.preconditioner

    def kfac_fb() -> None:
        model.zero_grad(set_to_none=True)
        spec.loss_fn(model(x), y).backward()

    capture_flops = count_flops(kfac_fb) - fb_flops
    pre.update_factors()
    pre.update_inverses(force=True)
    mats = pre.gradient_matrices()
    precondition_flops = count_flops(
        lambda: [pre.precondition(pre.blocks[name], mat) for name, mat in mats.items()]
    )
    factor_sizes = []
    for block in pre.blocks.values():
        # Kronecker factors are (groups, n, n) running averages; diagonal blocks keep vectors (no inverse).
        for key, value in block.state.items():
            if key.endswith("_ema") and value.dim() >= 2 and value.shape[-1] == value.shape[-2]:
                factor_sizes += [int(value.shape[-1])] * (value.numel() // value.shape[-1] ** 2)
    elem = x.new_zeros((), dtype=next(model.parameters()).dtype).element_size()
    n_params = sum(p.numel() for p in model.parameters())
    opt.close()
    return {
        "factor_sizes": factor_sizes,
        "n_params": n_params,
        "inverse_method": hparams.get("inverse_method", "cholesky"),
        "flops": {"forward_backward": fb_flops, "capture": capture_flops, "precondition": precondition_flops},
        "bytes": {
            # read the EMA and the batch factor, write the EMA
            "fold": 3 * elem * sum(n * n for n in factor_sizes),
            # read the gradient, read and write the parameter and its momentum
            "update": 5 * elem * n_params,
        },
    }


def phase_floors(costs: dict[str, Any], rates: MachineRates) -> dict[str, tuple[float, str, str]]:
    """(floor seconds, work per call, basis) of every phase at the measured rates."""
    out: dict[str, tuple[float, str, str]] = {}
    for p, flops in costs["flops"].items():
        out[p] = (flops / rates.matmul_flops, f"{flops / 1e9:.3g} GFLOP", "GEMM rate")
    for p, nbytes in costs["bytes"].items():
        out[p] = (nbytes / rates.bandwidth, f"{nbytes / 1e6:.3g} MB", "memory bandwidth")
    method, sizes = costs["inverse_method"], costs["factor_sizes"]
    inv_time = rates.cholesky_inverse_time if method == "cholesky" else rates.eigh_time
    cubes = sum(n**3 for n in sizes) / 1e9
    out["inverse"] = (
        sum(inv_time(n) for n in sizes),
        f"sum n^3 = {cubes:.3g}e9 over {len(sizes)} factors",
        f"{method} time at n={rates.cholesky_ref_n} scaled by n^3",
    )
    return out


# -------------------------------------------------------------------------------------- bench
def kfac_variants(intervals: list[str], base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """K-FAC configurations from 'factor:inverse' interval strings; the first is the default."""
    out = {}
    for item in intervals:
        f, i = (int(v) for v in item.split(":"))
        default = (KFAC_DEFAULTS["factor_update_steps"], KFAC_DEFAULTS["inverse_update_steps"])
        label = "kfac" if (f, i) == default else f"kfac f{f}/i{i}"
        out[label] = {**base, "factor_update_steps": f, "inverse_update_steps": i}
    return out


def compiled_label(label: str, backend: str) -> str:
    """The label of a K-FAC variant's compiled twin."""
    return f"{label} compiled ({backend})"


def bench_one(
    spec: ModelSpec, batch_size: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """All optimizers on one model and batch size; returns the record written to JSON."""
    clock = Clock(device)
    with seeded(0):
        model0 = spec.build().to(device)
    x, y = spec.batch(batch_size, device)
    base = {"lr": 1e-4, "damping": 1.0, "momentum": 0.9}
    variants = kfac_variants(args.intervals, base)
    first_f, first_i = (int(v) for v in args.intervals[0].split(":"))
    cycle = math.lcm(
        *[h[k] for h in variants.values() for k in ("factor_update_steps", "inverse_update_steps")]
    )
    contenders: list[Contender] = []
    errors: dict[str, str] = {}
    wanted: list[tuple[str, str, dict[str, Any]]] = [(label, "kfac", h) for label, h in variants.items()]
    if args.compile:
        wanted += [
            (compiled_label(label, args.compile), "kfac", {**h, "compile_step": args.compile})
            for label, h in variants.items()
        ]
    qmodel = qmodel_options()
    if qmodel is not None and "kfac-qmodel" in args.optimizers:
        wanted.append(("kfac-qmodel", "kfac-qmodel", next(iter(variants.values()))))
    wanted += [("adam", "adam", {"lr": 1e-5}), ("sgd", "sgd", {"lr": 1e-6, "momentum": 0.9})]
    # KAISA (kfac-pytorch, when installed) at the same intervals as each K-FAC variant.
    wanted += [
        (
            label.replace("kfac", "kaisa", 1),
            "kaisa",
            {
                **base,
                "factor_update_steps": h["factor_update_steps"],
                "inverse_update_steps": h["inverse_update_steps"],
            },
        )
        for label, h in variants.items()
    ]
    wanted += [
        ("approxngd", "approxngd", {"lr": 1e-4, "damping": 1.0, "momentum": 0.9}),
        (
            "asdl",
            "asdl",
            {
                "lr": 1e-7,
                "damping": 1.0,
                "momentum": 0.9,
                "data_size": batch_size,
                "factor_interval": first_f,
                "inverse_interval": first_i,
                "ema_decay": 0.95,
            },
        ),
    ]
    for label, kind, hparams in wanted:
        if kind not in args.optimizers and label not in args.optimizers:
            continue
        try:
            trainer = make_trainer(kind, copy.deepcopy(model0), spec.loss_fn, hparams)
            # The phase timer's wrappers would be traced into a compiled step: not for those.
            timed = kind.startswith("kfac") and "compile_step" not in hparams
            timer = PhaseTimer(trainer.optimizer, clock) if timed else None  # type: ignore[attr-defined]
            contender = Contender(label, trainer, timer)
            # Warm-up past K-FAC's curvature warm-up (every-step refreshes), ending on a cycle boundary.
            start = clock()
            for _ in range(cycle * math.ceil(KFAC_DEFAULTS["warmup_steps"] / cycle)):
                contender.run_step(x, y, clock, record=False)
            contender.warmup_s = clock() - start
            contenders.append(contender)
        except Exception as exc:  # a third-party library that fails is recorded, not fatal
            errors[label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if args.verbose:
                traceback.print_exc()
    # The optimizers take turns step by step, so that a burst of load from other processes on a
    # shared machine hits all of them within the same cycle.
    for rep in range(args.reps):
        RATE_SAMPLES.append(measure_rates(device, ref_n=args.ref_n, numel=args.ref_n**2 * 16))
        live = [c for c in contenders if c.label not in errors]
        order = live[rep % len(live) :] + live[: rep % len(live)] if live else []
        for _ in range(cycle):
            for contender in order:
                if contender.label in errors:
                    continue
                try:
                    contender.run_step(x, y, clock, record=True)
                except Exception as exc:
                    errors[contender.label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    contenders = [c for c in contenders if c.label not in errors]
    profile = None
    kfac_default = next((c for c in contenders if c.label == "kfac"), None)
    if args.profile and kfac_default is not None:
        profile = profile_cycle(kfac_default, x, y, cycle, clock)
    summary = {}
    for c in contenders:
        cycles = [c.steps[i : i + cycle] for i in range(0, len(c.steps), cycle)]
        summary[c.label] = {
            "step_ms": 1e3 * median([sum(s["total"] for s in cyc) / cycle for cyc in cycles]),
            "forward_backward_ms": 1e3 * median([s["fb"] for s in c.steps]),
            "update_ms": 1e3 * median([sum(s["update"] for s in cyc) / cycle for cyc in cycles]),
            "cycle_step_ms": [1e3 * sum(s["total"] for s in cyc) / cycle for cyc in cycles],
            "warmup_s": c.warmup_s,
        }
    if args.compile:
        for label in variants:
            compiled, eager = summary.get(compiled_label(label, args.compile)), summary.get(label)
            if compiled is not None and eager is not None:
                ratios = [
                    e / c for e, c in zip(eager["cycle_step_ms"], compiled["cycle_step_ms"], strict=False)
                ]
                compiled["speedup_vs_eager_paired_median"] = median(ratios)
    if "adam" in summary:
        adam_cycles = summary["adam"]["cycle_step_ms"]
        for rec in summary.values():
            ratios = [a / b for a, b in zip(rec["cycle_step_ms"], adam_cycles, strict=False)]
            rec["vs_adam_paired_median"] = median(ratios)
            rec["vs_adam"] = rec["step_ms"] / summary["adam"]["step_ms"]
    phases = {}
    for c in contenders:
        if c.timer is None:
            continue
        hparams = next(h for lab, _, h in wanted if lab == c.label)
        try:
            costs = kfac_costs(spec, model0, x, y, hparams)
        except Exception as exc:
            errors[f"{c.label} phase costs"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            continue
        phases[c.label] = kfac_phase_times(c, cycle, hparams, costs)
    return {
        "model": spec.name,
        "description": spec.description,
        "batch_size": batch_size,
        "cycle_steps": cycle,
        "optimizers": summary,
        "kfac_phases": phases,
        "kfac_profile": profile,
        "errors": errors,
    }


def profile_cycle(c: Contender, x: Tensor, y: Tensor, cycle: int, clock: Clock) -> list[dict[str, Any]]:
    """torch.profiler over one update cycle of K-FAC: the operators with the most self time, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(cycle):
            c.run_step(x, y, clock, record=False)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / cycle,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / cycle,
            "total_cpu_ms_per_step": e.cpu_time_total / 1e3 / cycle,
        }
        for e in rows[:15]
    ]


def kfac_phase_times(
    c: Contender, cycle: int, hparams: dict[str, Any], costs: dict[str, Any]
) -> dict[str, Any]:
    """Per-call and amortized times of each K-FAC phase (floors are added once the rates are final)."""
    f_int, i_int = hparams["factor_update_steps"], hparams["inverse_update_steps"]
    every = {p: {"capture": f_int, "fold": f_int, "inverse": i_int}.get(p, 1) for p in PHASES}
    per_step: dict[str, list[float]] = {p: [] for p in PHASES}
    per_call: dict[str, list[float]] = {p: [] for p in PHASES}
    for k, s in enumerate(c.steps):
        values = {
            "forward_backward": s["fb"] - s["capture"],
            "capture": s["capture"],
            "fold": s["fold"],
            "inverse": s["inverse"],
            "precondition": s["precondition"],
            "update": s["update"] - s["fold"] - s["inverse"] - s["precondition"],
        }
        for p, v in values.items():
            per_step[p].append(v)
            if (k % cycle) % every[p] == 0:
                per_call[p].append(v)
    table = {}
    for p in PHASES:
        cycles = [per_step[p][i : i + cycle] for i in range(0, len(per_step[p]), cycle)]
        table[p] = {
            "every_steps": every[p],
            "per_call_ms": 1e3 * median(per_call[p]),
            "per_step_ms": 1e3 * median([sum(cyc) / cycle for cyc in cycles]),
        }
    return {"hparams": hparams, "costs": costs, "phases": table}


def add_floors(ph: dict[str, Any], rates: MachineRates) -> None:
    """Fill in each phase's work, floor and ratio to the floor, at the run's best rates."""
    floors = phase_floors(ph["costs"], rates)
    for p, r in ph["phases"].items():
        floor, work, basis = floors[p]
        r.update(
            work_per_call=work,
            floor_ms=1e3 * floor,
            floor_basis=basis,
            ratio_to_floor=r["per_call_ms"] / (1e3 * floor) if floor > 0 else math.nan,
        )
    ph["amortized_floor_ms"] = sum(r["floor_ms"] / r["every_steps"] for r in ph["phases"].values())


# ------------------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    """The results as markdown tables."""
    env, rates = result["environment"], result["rates"]
    lines = [
        "# K-FAC step cost",
        "",
        f"Command: `{result['command']}`",
        "",
        machine_line(env),
        "",
        f"Rates measured in this run (median of {result['rate_samples']} samples taken between update "
        f"cycles, each the best of 3 calls): GEMM {rates['matmul_flops'] / 1e9:.0f} GFLOP/s "
        f"(n={rates['cholesky_ref_n']}, float32), memory bandwidth {rates['bandwidth'] / 1e9:.0f} GB/s, "
        f"cholesky_ex + cholesky_inverse at n={rates['cholesky_ref_n']}: "
        f"{1e3 * rates['cholesky_inverse_s']:.1f} ms, "
        f"eigh at n={rates['cholesky_ref_n']}: {1e3 * rates['eigh_s']:.1f} ms.",
        "",
        "Times are medians over repeated update cycles, the optimizers taking turns cycle by cycle. "
        "'step' is zero_grad + forward + backward + optimizer step, amortized over a cycle "
        "(so K-FAC's inverse updates are spread over the steps between them). "
        "'x Adam' is the median of the cycle-by-cycle ratios.",
        "",
    ]
    for run in result["runs"]:
        lines += [f"## {run['model']}, batch {run['batch_size']}", "", run["description"] + ".", ""]
        lines += [
            "| optimizer | step ms (amortized) | forward+backward ms | x Adam | x eager | warm-up s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, rec in run["optimizers"].items():
            ratio = rec.get("vs_adam_paired_median", math.nan)
            speedup = rec.get("speedup_vs_eager_paired_median")
            lines.append(
                f"| {label} | {rec['step_ms']:.1f} | {rec['forward_backward_ms']:.1f} | {ratio:.2f} | "
                f"{'' if speedup is None else f'{speedup:.2f}'} | {rec.get('warmup_s', math.nan):.1f} |"
            )
        for label, err in run["errors"].items():
            lines.append(f"| {label} | failed: {err.replace('|', '/')} | | | | |")
        lines.append("")
        if run.get("kfac_profile"):
            lines += [
                "Profile of the default K-FAC step (torch.profiler, one update cycle; self time per step, "
                "profiler overhead included):",
                "",
                "| operator | calls/step | self ms/step | total ms/step |",
                "|---|---:|---:|---:|",
            ]
            for e in run["kfac_profile"][:12]:
                lines.append(
                    f"| `{e['op']}` | {e['calls_per_step']:.1f} | {e['self_cpu_ms_per_step']:.2f} "
                    f"| {e['total_cpu_ms_per_step']:.2f} |"
                )
            lines.append("")
        for label, ph in run["kfac_phases"].items():
            h = ph["hparams"]
            lines += [
                f"**{label}** phases (factor_update_steps={h['factor_update_steps']}, "
                f"inverse_update_steps={h['inverse_update_steps']}, {h.get('inverse_method', 'cholesky')}):",
                "",
                "| phase | every | ms per call | ms per step | work per call | floor ms | per call / floor |",
                "|---|---:|---:|---:|---|---:|---:|",
            ]
            for p in PHASES:
                r = ph["phases"][p]
                lines.append(
                    f"| {PHASE_LABELS[p]} | {r['every_steps']} | {r['per_call_ms']:.2f} "
                    f"| {r['per_step_ms']:.2f} "
                    f"| {r['work_per_call']} | {r['floor_ms']:.2f} | {r['ratio_to_floor']:.2f} |"
                )
            total = sum(ph["phases"][p]["per_step_ms"] for p in PHASES)
            lines += [
                f"| **sum** | | | {total:.2f} | | {ph['amortized_floor_ms']:.2f} (amortized) | "
                f"{total / ph['amortized_floor_ms']:.2f} |",
                "",
            ]
    lines += [
        "Floors: forward+backward, capture and preconditioning count the FLOPs that torch issues "
        "(FlopCounterMode) at the GEMM rate above; the inverse update is the measured Cholesky inverse at "
        "the reference size scaled by n^3 for every factor; the EMA fold and the update are the minimum "
        "bytes moved at the measured bandwidth.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["autoencoder", "convnet", "transformer"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="override every model's batch sizes")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["kfac", "kfac-qmodel", "adam", "sgd", "approxngd", "asdl", "kaisa"],
        help="optimizer kinds to compare",
    )
    parser.add_argument(
        "--intervals",
        nargs="+",
        default=["{factor_update_steps}:{inverse_update_steps}".format(**KFAC_DEFAULTS)],
        help="K-FAC 'factor_update_steps:inverse_update_steps' settings (the library's defaults are "
        "labelled 'kfac', which kfac-qmodel and ASDL use too; give them first)",
    )
    parser.add_argument(
        "--compile",
        metavar="BACKEND",
        help="also time every K-FAC variant with compile_step=BACKEND (e.g. inductor), side by side",
    )
    parser.add_argument("--reps", type=int, default=5, help="timed update cycles per optimizer")
    parser.add_argument("--quick", action="store_true", help="tiny models and one batch size (for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the .json/.md results")
    parser.add_argument("--name", default="step_cost", help="file name of the results (without suffix)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also profile one K-FAC cycle per model/batch")
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormal floats to zero on the CPU (by default they are flushed, see README)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.threads = args.threads or 1
    args.ref_n = 256 if args.quick else 1024
    if args.quick and args.reps == 5:
        args.reps = 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write JSON and markdown, print the markdown."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.keep_denormals:
        torch.set_flush_denormal(True)
    specs = model_specs(args.quick)
    env = environment(device)
    env["flush_denormal"] = device.type == "cpu" and not args.keep_denormals
    result: dict[str, Any] = {"command": command_line(__file__, argv), "environment": env, "runs": []}
    RATE_SAMPLES.clear()
    for name in args.models:
        spec = specs[name]
        for batch_size in args.batch_sizes or spec.batch_sizes:
            result["runs"].append(bench_one(spec, batch_size, args, device))
            print(f"done: {name} batch {batch_size}", flush=True)
    env["load_average_at_end"] = os.getloadavg()
    rates = MachineRates.combine(RATE_SAMPLES, median)
    result["rates"] = rates.__dict__
    result["rates_best"] = best_rates(RATE_SAMPLES).__dict__
    result["rate_samples"] = len(RATE_SAMPLES)
    for run in result["runs"]:
        for ph in run["kfac_phases"].values():
            add_floors(ph, rates)
    text = markdown(result)
    write_results(args.out, args.name, result, text)
    print(text)
    if env["flush_denormal"]:
        torch.set_flush_denormal(False)
    return result


if __name__ == "__main__":
    main()
