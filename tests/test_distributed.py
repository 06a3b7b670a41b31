"""torch_kfac.distributed: real gloo processes (2 and 4 ranks) against the single-process run.

Every rank trains on its shard of a global batch; the factors, inverses, last update and
parameters after 5 steps must equal those of one process on the concatenated batch, for every
grad_worker_fraction, for the plain, the fully adaptive and the EKFAC configuration. The
processes of a world size are spawned once and run every check of that size.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torch_kfac import KFAC, KFACPreconditioner
from torch_kfac.distributed import LAYOUT_KEY, greedy_assignment
from torch_kfac.options import check_fraction

GLOBAL_BATCH = 8
STEPS = 5
TOL = 1e-10
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {
        "lr": 0.1,
        "damping": 1e-2,
        "warmup_steps": 1,
        "factor_update_steps": 2,
        "inverse_update_steps": 3,
    },
    "adaptive": {
        "damping": 1e-1,
        "adapt_damping": True,
        "damping_adaptation_interval": 1,
        "adaptive_learning_rate": True,
        "adaptive_momentum": True,
        "reject_steps": True,
        "qmodel_curvature": "exact",
        "fisher_type": "mc",
        "mc_seed": 7,
        "inverse_method": "eigh",
        "warmup_steps": 2,
        "factor_update_steps": 2,
        "inverse_update_steps": 2,
    },
    "ekfac": {
        "lr": 0.1,
        "damping": 1e-2,
        "approximation": "ekfac",
        "inverse_method": "eigh",
        "warmup_steps": 3,
    },
}
INVERSE_KEYS = ("A_inv", "G_inv", "A_eigvals", "A_eigvecs", "G_eigvals", "G_eigvecs")


def make_model() -> nn.Module:
    """Two convolutions and two linear layers (four blocks, so that four ranks all own one)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()


def global_batch(step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (and micro-batch), the same on every rank."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return (
        torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen),
    )


def shard(
    batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    size = GLOBAL_BATCH // world
    return batch[0][rank * size : (rank + 1) * size], batch[1][rank * size : (rank + 1) * size]


def train(
    config: str,
    fraction: float = 1.0,
    *,
    steps: int = STEPS,
    start: int = 0,
    ddp: bool = False,
    accumulate: bool = False,
    load: Path | None = None,
    save: Path | None = None,
    standalone: bool = False,
    poisoned_step: int | None = None,
    bare: bool = False,
    find_unused: bool = False,
    wrap_after: bool = False,
    built: tuple[nn.Module, KFAC | KFACPreconditioner] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train on this rank's shards; returns parameters, last update, factors and held inverses.
    `poisoned_step`: that step's inputs are NaN (the step is skipped). `bare`: `opt.step()`, the
    loss and batch taken from the training pass. `find_unused`: DDP's `find_unused_parameters`
    (its outputs are then new tensors, not the wrapped module's). `wrap_after`: the optimizer is
    built on the module, which is wrapped after it (the Hugging Face Trainer's order). `built`: a
    model and its optimizer (with `standalone`, its preconditioner) built before the process group
    was initialized."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    inner = make_model() if built is None else built[0]
    model: nn.Module = (
        nn.parallel.DistributedDataParallel(inner, find_unused_parameters=find_unused)
        if ddp and not wrap_after
        else inner
    )
    loss_fn = nn.CrossEntropyLoss()
    kwargs = {**CONFIGS[config], **options, "grad_worker_fraction": fraction}
    if standalone:  # KFACPreconditioner in front of SGD
        lr = kwargs.pop("lr")
        pre = KFACPreconditioner(model, **kwargs) if built is None else built[1]
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif built is not None:
        opt = built[1]
    else:
        opt = KFAC(model, loss_fn=loss_fn, **kwargs)
    if wrap_after:
        model = nn.parallel.DistributedDataParallel(inner, find_unused_parameters=find_unused)
    if load is not None:
        saved = torch.load(load, weights_only=False)
        inner.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    before: dict[str, torch.Tensor] = {}
    for step in range(start, start + steps):
        before = {n: p.detach().clone() for n, p in inner.named_parameters()}
        inner.zero_grad()
        micros = [0, 1] if accumulate else [0]
        for micro in micros:
            x, y = shard(global_batch(step, micro), rank, world)
            if step == poisoned_step:
                x = torch.full_like(x, float("nan"))
            last = micro == micros[-1]
            # Gradient accumulation: each micro-batch's loss divided by their number.
            if ddp and not last:
                with model.no_sync():  # type: ignore[operator]
                    loss = loss_fn(model(x), y)
                    (loss / len(micros)).backward()
            else:
                loss = loss_fn(model(x), y)
                (loss / len(micros)).backward()
        if world > 1 and not ddp:  # a plain model: the user averages the gradients
            for p in inner.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        if standalone:
            pre.step()
            sgd.step()
        elif bare:
            opt.step()
        else:
            opt.step(loss=loss, batch=(x, y))
    if not standalone:
        pre = opt.preconditioner
    sent = dict(pre.distributed.bytes) if pre.distributed is not None else {}
    state = pre.state_dict() if standalone else opt.state_dict()  # collective in distributed runs
    if save is not None and rank == 0:
        torch.save({"model": inner.state_dict(), "opt": state}, save)
    return {
        "params": {n: p.detach().clone() for n, p in inner.named_parameters()},
        "update": {n: p.detach() - before[n] for n, p in inner.named_parameters()},
        "factors": {
            n: {k: b.state[f"{k}_ema"] / b.state[f"{k}_weight"] for k in b.FACTORS if b.has_factor(k)}
            for n, b in pre.blocks.items()
        },
        "inverses": {
            n: {k: b.state[k].clone() for k in INVERSE_KEYS if k in b.state} for n, b in pre.blocks.items()
        },
        "damping": pre.damping.clone(),
        "bytes": sent,
        "layout": dict(pre.global_state.get(LAYOUT_KEY, {})),
    }


def fractions(world: int) -> list[float]:
    return [1.0, 0.5, 0.25][: {2: 2, 4: 3}[world]]


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    out = Path(folder)
    # Built before the process group exists (the Hugging Face Trainer initializes it afterwards).
    early = make_model()
    config = {**CONFIGS["adaptive"], "mc_seed": None, "grad_worker_fraction": 0.5}
    early_opt = KFAC(early, loss_fn=nn.CrossEntropyLoss(), **config)
    early_alone = make_model()
    plain = {k: v for k, v in CONFIGS["plain"].items() if k != "lr"}
    early_pre = KFACPreconditioner(early_alone, **plain, grad_worker_fraction=0.5)
    # ... and one that stepped before it.
    late = make_model()
    late_opt = KFAC(late, lr=0.1)
    x, y = shard(global_batch(0), rank, world)
    nn.functional.cross_entropy(late(x), y).backward()
    late_opt.step()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    results: dict[Any, Any] = {}
    for config in CONFIGS:
        for fraction in fractions(world):
            results[(config, fraction)] = train(config, fraction)
    if world == 4:
        train("adaptive", 0.25, steps=3, save=out / "ckpt4.pt")
    else:
        results["ddp"] = train("plain", 0.5, ddp=True)
        results["ddp_bare"] = train("adaptive", 0.5, ddp=True, bare=True)
        results["ddp_bare_unused"] = train("adaptive", 0.5, ddp=True, bare=True, find_unused=True)
        results["ddp_bare_after"] = train(
            "adaptive", 0.5, ddp=True, bare=True, find_unused=True, wrap_after=True
        )
        results["float32"] = _float32_replica(rank)
        results["triangles"] = train("plain", 0.5, reduce_upper_triangle=True)
        results["skipped"] = train("plain", 0.5, poisoned_step=2)
        results["mc_unseeded"] = train("adaptive", 0.5, mc_seed=None)
        results["built_before_init"] = train("adaptive", 0.5, mc_seed=None, built=(early, early_opt))
        nn.functional.cross_entropy(late(x), y).backward()
        with pytest.raises(RuntimeError, match="initialized after the optimizer's first step") as err:
            late_opt.step()
        results["stepped_before_init"] = str(err.value)
        results["preconditioner"] = train("plain", 0.5, standalone=True)
        results["preconditioner_built_before_init"] = train(
            "plain", 0.5, standalone=True, built=(early_alone, early_pre)
        )
        results["ddp_no_sync"] = train("plain", 1.0, ddp=True, accumulate=True)
        results["resumed"] = train(
            "adaptive",
            0.5,
            steps=3,
            start=3,
            load=Path(folder).parent / "w4" / "ckpt4.pt",
            save=out / "ckpt2.pt",
        )
        results["fsdp"] = _fsdp_error()
        results["copy"] = _copy_error()
        results["compile_step"] = _compile_step_error()
        results["raise"] = _raise_in_step(rank)
    torch.save(results, out / f"rank{rank}.pt")
    if world == 4:
        dist.destroy_process_group()


def _float32_replica(rank: int) -> list[torch.Tensor]:
    """A float32 MLP under DDP after 4 K-FAC steps with inverses refreshed (and broadcast by their
    owners) every step, each rank on its half of the batch: this rank's parameters."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    model = nn.parallel.DistributedDataParallel(inner)
    opt = KFAC(model, lr=0.1, damping=1e-2, factor_update_steps=1, inverse_update_steps=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(64, 20, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(
            model(x[rank * 32 : (rank + 1) * 32]), y[rank * 32 : (rank + 1) * 32]
        ).backward()
        opt.step()
    return [p.detach().clone() for p in inner.parameters()]


def _fsdp_error() -> str:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    try:
        KFAC(model, lr=0.1)
    except ValueError as err:
        return str(err)
    return ""


def _copy_error() -> str:
    import copy

    try:
        copy.deepcopy(KFAC(make_model(), lr=0.1))
    except TypeError as err:
        return str(err)
    return ""


def _compile_step_error() -> str:
    try:
        KFAC(make_model(), lr=0.1, compile_step="eager")
    except ValueError as err:
        return str(err)
    return ""


def _raise_in_step(rank: int) -> float:
    """Rank 1 raises inside step; returns how long rank 0 waited before its own error."""
    model = make_model()
    opt = KFAC(model, lr=0.1)
    x, y = shard(global_batch(0), rank, 2)
    nn.CrossEntropyLoss()(model(x), y).backward()
    if rank == 1:

        def fail() -> None:
            raise RuntimeError("injected failure")

        opt.preconditioner.gradient_matrices = fail  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="injected"):
            opt.step(loss=torch.tensor(1.0))
        dist.destroy_process_group()
        return 0.0
    start = time.perf_counter()
    with pytest.raises(RuntimeError):
        opt.step(loss=torch.tensor(1.0))
    return time.perf_counter() - start


def _spawn(world: int, folder: Path) -> list[dict[Any, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, str(folder)), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    root = tmp_path_factory.mktemp("dist")
    four = _spawn(4, root / "w4")
    two = _spawn(2, root / "w2")
    return {2: two, 4: four, "root": root}


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    return {config: train(config) for config in CONFIGS}


def max_difference(result: dict[str, Any], ref: dict[str, Any]) -> float:
    """Largest |difference| over parameters, update, factors and the inverses this rank holds."""
    worst = 0.0
    for part in ("params", "update"):
        for n, t in ref[part].items():
            worst = max(worst, (result[part][n] - t).abs().max().item())
    for n, entries in result["factors"].items():
        for k, t in entries.items():
            worst = max(worst, (t - ref["factors"][n][k]).abs().max().item())
    for n, entries in result["inverses"].items():
        for k, t in entries.items():
            if k.endswith("_eigvecs"):  # the basis of a repeated eigenvalue is arbitrary: compare
                # V (1 + lambda)^-1 V^T, which a damped preconditioner depends on, instead
                key = k.replace("vecs", "vals")
                t, other = (
                    (e[k] / (1 + e[key]).unsqueeze(-2)) @ e[k].mT for e in (entries, ref["inverses"][n])
                )
            else:
                other = ref["inverses"][n][k]
            worst = max(worst, (t - other).abs().max().item())
    return worst


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_strategy_equals_one_process_on_the_concatenated_batch(
    runs: dict[Any, Any], reference: dict[str, dict[str, Any]], world: int, config: str
) -> None:
    for fraction in fractions(world):
        held = 0
        for rank, result in enumerate(runs[world]):
            res = result[(config, fraction)]
            diff = max_difference(res, reference[config])
            print(f"table: f={fraction} config={config} world={world} rank={rank} max|diff|={diff:.2e}")
            assert diff < TOL, (fraction, rank)
            held += sum(len(v) for v in res["inverses"].values())
        # Memory: with f < 1 a rank holds only its column's inverses (EKFAC's bases go everywhere).
        total = sum(len(v) for v in reference[config]["inverses"].values())
        if config != "ekfac" and fraction < 1:
            assert held < world * total
        if fraction == 1.0 or config == "ekfac":
            assert held == world * total


def test_preconditioner_in_front_of_sgd_and_upper_triangle_reduction(
    runs: dict[Any, Any], reference: dict[str, dict[str, Any]]
) -> None:
    alone = train("plain", standalone=True)
    for result in runs[2]:
        assert max_difference(result["preconditioner"], alone) < TOL
        assert max_difference(result["triangles"], reference["plain"]) < TOL
        # On CPUs the default sends whole matrices; the triangles are about half of that.
        assert result["triangles"]["bytes"]["factors"] < 0.6 * result[("plain", 0.5)]["bytes"]["factors"]


def test_ranks_keep_bit_identical_float32_parameters(runs: dict[Any, Any]) -> None:
    """DDP relies on identical replicas. An inverse's owner used its Cholesky inverse in the layout
    it was computed in (column-major), the ranks it broadcast it to a row-major copy: the products
    rounded differently and the float32 replicas drifted apart by an ulp a step (float64 and the
    tolerance of the other tests hid it)."""
    first, second = (result["float32"] for result in runs[2])
    assert all(p.dtype == torch.float32 and torch.equal(p, q) for p, q in zip(first, second, strict=True))


def test_a_bare_step_under_ddp_takes_each_ranks_batch_from_its_training_pass(
    runs: dict[Any, Any], reference: dict[str, dict[str, Any]]
) -> None:
    """`opt.step()` on a DDP-wrapped model: each rank's shard and loss come from its own pass
    through the wrapper (torch_kfac.last_batch), and the run is one process's on the whole batch.
    With `find_unused_parameters` the wrapper returns copies of the module's outputs: the pass is
    watched on the wrapper, or, when the wrapper came after the optimizer, the copy is recognised
    by the mark its original left in the autograd graph."""
    for result in runs[2]:
        for run in ("ddp_bare", "ddp_bare_unused", "ddp_bare_after"):
            assert max_difference(result[run], reference["adaptive"]) < TOL, run


def test_a_skipped_step_leaves_the_averaged_factors_as_one_process_leaves_them(
    runs: dict[Any, Any],
) -> None:
    # Step 2's NaN statistics are averaged over the ranks and must not be folded in (the step's mask).
    with pytest.warns(RuntimeWarning, match="skipped"):
        alone = train("plain", poisoned_step=2)
    for result in runs[2]:
        skipped = result["skipped"]
        assert all(t.isfinite().all() for entries in skipped["factors"].values() for t in entries.values())
        assert max_difference(skipped, alone) < TOL


def test_mc_fisher_without_a_seed_draws_with_rank_0s_seed_on_every_rank(runs: dict[Any, Any]) -> None:
    # Every rank seeds the sampling with rank 0's initial seed: 0, from make_model's manual_seed.
    alone = train("adaptive", mc_seed=0)
    for result in runs[2]:
        assert max_difference(result["mc_unseeded"], alone) < TOL


def test_an_optimizer_built_before_the_process_group_joins_the_ranks_at_its_first_step(
    runs: dict[Any, Any],
) -> None:
    """The Hugging Face Trainer initializes torch.distributed after the user built the optimizer
    (KFAC, or KFACPreconditioner in front of SGD): the first step joins the ranks (averaged
    statistics, owners, the shared MC seed), so the run is still one process's on the whole batch.
    Before, each rank kept its own factors and the replicas drifted apart."""
    alone = train("adaptive", mc_seed=0)
    alone_pre = train("plain", standalone=True)
    for result in runs[2]:
        assert max_difference(result["built_before_init"], alone) < TOL
        # KFACPreconditioner in front of SGD joins the ranks at its first step too.
        assert max_difference(result["preconditioner_built_before_init"], alone_pre) < TOL
        # One that stepped alone first has factors of its own rank's: an error, not drifting replicas.
        assert "Initialize the process group before the first step" in result["stepped_before_init"]


def test_ddp_wrapped_model_and_no_sync_accumulation(
    runs: dict[Any, Any], reference: dict[str, dict[str, Any]]
) -> None:
    for result in runs[2]:
        assert max_difference(result["ddp"], reference["plain"]) < TOL
        # Block names are those of the unwrapped model (no `module.` prefix).
        assert set(result["ddp"]["factors"]) == set(reference["plain"]["factors"])
    accumulated = train("plain", accumulate=True)
    for result in runs[2]:
        assert max_difference(result["ddp_no_sync"], accumulated) < TOL


def test_checkpoint_saved_with_4_ranks_continues_with_2_and_1(
    runs: dict[Any, Any],
) -> None:
    full = train("adaptive", steps=9)
    ckpt = runs["root"] / "w2" / "ckpt2.pt"
    after_two = train("adaptive", steps=3, start=6, load=ckpt)
    for result in runs[2]:
        assert max_difference(result["resumed"], train("adaptive", steps=6)) < TOL
    assert max_difference(after_two, full) < TOL


def test_fsdp_is_refused_with_what_is_supported(runs: dict[Any, Any]) -> None:
    for result in runs[2]:
        assert "sharded parameters" in result["fsdp"] and "DistributedDataParallel" in result["fsdp"]


def test_a_copy_is_refused_in_distributed_runs_with_what_to_do(runs: dict[Any, Any]) -> None:
    for result in runs[2]:
        assert "cannot be copied or pickled in a distributed run" in result["copy"]
        assert "state_dict()" in result["copy"]


def test_compile_step_is_refused_in_distributed_runs_with_the_reason(runs: dict[Any, Any]) -> None:
    for result in runs[2]:
        assert result["compile_step"] == (
            "compile_step is not supported in distributed runs (the preconditioning broadcasts)"
        )


def test_a_rank_raising_in_step_does_not_hang_the_others(runs: dict[Any, Any]) -> None:
    assert runs[2][0]["raise"] < 30  # the process group's timeout


def test_communication_happens_only_where_needed(runs: dict[Any, Any]) -> None:
    for result in runs[4]:
        assert result[("plain", 1.0)]["bytes"].get("gradients", 0) == 0  # f = 1: no gradient traffic
        assert result[("plain", 0.25)]["bytes"].get("inverses", 0) == 0  # f = 1/W: no inverse traffic
        assert result[("plain", 0.5)]["bytes"]["gradients"] > 0


def test_greedy_assignment_balances_cubic_costs() -> None:
    owners = greedy_assignment({"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 1.0}, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        check_fraction("grad_worker_fraction", 0.0)
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        KFAC(make_model(), lr=0.1, grad_worker_fraction=1.5)


def test_torchrun_restart_after_a_killed_rank_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 is killed at step 7 of 10 (checkpoints every 4 steps); torchrun restarts the group,
    which resumes at step 4 and ends where one process on the whole batches ends."""
    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "distributed.py"
    common = ["--steps", "10", "--checkpoint-every", "4", "--dtype", "float64", "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "1", str(script), *common, "--kill-rank-at-step", "7",
        "--checkpoint", str(tmp_path / "killed" / "ckpt.pt"), "--final", str(tmp_path / "killed.pt"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    (tmp_path / "torchrun.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attempt 1: restart at step 4" in (tmp_path / "killed" / "attempts.log").read_text()
    # The uninterrupted reference: one process (a world of one) on the concatenated batches.
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(script.parent))
    import distributed as example  # examples/distributed.py

    example.main([*common, "--final", str(tmp_path / "single.pt")])
    killed = torch.load(tmp_path / "killed.pt", weights_only=False)
    single = torch.load(tmp_path / "single.pt", weights_only=False)
    for name, value in single.items():
        assert (killed[name] - value).abs().max() < TOL, name
