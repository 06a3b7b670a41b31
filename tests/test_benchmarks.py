"""Runs benchmarks/step_cost.py and benchmarks/time_to_loss.py in their quick modes and checks the outputs."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import layout_warnings

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    """The benchmark modules, imported from benchmarks/ (their own `common` first on the path)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    names = (
        "common",
        "step_cost",
        "time_to_loss",
        "inverse_methods",
        "race",
        "initial_damping",
        "presets_seeds",
        "race_seeds",
        "patch_sampling",
        "step_breakdown",
        "per_step",
        "accumulation",
    )
    for name in names:
        module = sys.modules.get(name)
        if module is not None and Path(getattr(module, "__file__", "") or "").parent != BENCH_DIR:
            monkeypatch.delitem(sys.modules, name)
    return {name: importlib.import_module(name) for name in names}


def test_step_cost_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Tiny models: every optimizer timed, every K-FAC phase with a positive floor, JSON and markdown."""
    argv = ["--quick", "--models", "autoencoder", "convnet", "--reps", "1"]
    argv += ["--optimizers", "kfac", "adam", "sgd", "--out", str(tmp_path)]
    result = bench["step_cost"].main(argv)
    saved = json.loads((tmp_path / "step_cost.json").read_text())
    assert saved["command"].startswith("python ") and "--quick" in saved["command"]
    assert [run["model"] for run in saved["runs"]] == ["autoencoder", "convnet"]
    for run in result["runs"]:
        assert run["errors"] == {}
        assert set(run["optimizers"]) == {"kfac", "adam", "sgd"}
        for rec in run["optimizers"].values():
            assert math.isfinite(rec["step_ms"]) and rec["step_ms"] > 0
            assert 0 < rec["forward_backward_ms"] <= rec["step_ms"] * run["cycle_steps"]
        assert run["optimizers"]["adam"]["vs_adam_paired_median"] == pytest.approx(1.0)
        phases = run["kfac_phases"]["kfac"]["phases"]
        assert set(phases) == set(bench["step_cost"].PHASES)
        defaults = bench["step_cost"].KFAC_DEFAULTS  # the library's default intervals
        assert phases["inverse"]["every_steps"] == defaults["inverse_update_steps"] == 10
        assert phases["capture"]["every_steps"] == defaults["factor_update_steps"] == 10
        for rec in phases.values():
            assert rec["per_call_ms"] >= 0 and rec["floor_ms"] > 0
            assert math.isfinite(rec["ratio_to_floor"])
    rates = saved["rates"]
    assert rates["matmul_flops"] > 0 and rates["bandwidth"] > 0 and rates["cholesky_inverse_s"] > 0
    text = (tmp_path / "step_cost.md").read_text()
    assert "## autoencoder, batch 8" in text and "| preconditioning |" in text and saved["command"] in text


def test_time_to_loss_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Tiny workloads on synthetic data: curves, targets, PNG, JSON and markdown are produced and sane."""
    argv = ["--quick", "--budget", "0.6", "--evals", "3", "--workloads", "autoencoder", "transformer"]
    argv += ["--optimizers", "adam", "kfac", "--clock", "cpu", "--out", str(tmp_path)]
    result = bench["time_to_loss"].main(argv)
    saved = json.loads((tmp_path / "time_to_loss.json").read_text())
    assert saved["command"] == result["command"] and "--quick" in saved["command"]
    assert saved["clock"] == "cpu"
    assert [w["name"] for w in saved["workloads"]] == ["autoencoder", "transformer"]
    for work in saved["workloads"]:
        assert "synthetic" in work["description"] or "Markov" in work["description"]
        assert {run["optimizer"] for run in work["runs"]} == {"adam", "kfac"}
        for run in work["runs"]:
            curve = run["curve"]
            assert run["steps"] >= 1 and len(curve) >= 2
            assert curve[0]["steps"] == 0 and curve[0]["seconds"] == 0.0
            assert all(a["seconds"] <= b["seconds"] for a, b in itertools.pairwise(curve))
            assert all(math.isfinite(p["loss"]) for p in curve)
            assert run["train_seconds"] >= 0.6
        summary = work["summary"]
        adam_target = next(t for t in summary["targets"] if t["name"].startswith("best Adam"))
        assert adam_target["loss"] == pytest.approx(summary["best"]["adam"]["best_loss"])
        assert summary["best"]["adam"]["to_target"][adam_target["name"]] is not None
    transformer = saved["workloads"][1]
    assert 0 < transformer["optimal_loss"] < math.log(32)
    assert (tmp_path / "time_to_loss.png").read_bytes()[:8] == PNG_MAGIC
    text = (tmp_path / "time_to_loss.md").read_text()
    assert saved["command"] in text and "| adam |" in text and "| kfac |" in text

    # Re-summarizing with a fixed target: no training, the target is reached from the start.
    stored = str(tmp_path / "time_to_loss.json")
    argv = ["--summarize-only", stored, "--targets", "autoencoder=1e9", "--out", str(tmp_path / "again")]
    again = bench["time_to_loss"].main(argv)
    summary = again["workloads"][0]["summary"]
    assert summary["targets"][0]["loss"] == 1e9
    assert summary["best"]["kfac"]["to_target"]["1e+09"] == {"seconds": 0.0, "steps": 0}
    assert "recomputed by" in (tmp_path / "again" / "time_to_loss.md").read_text()


def test_distributed_scale_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale model: f=1 sends no gradients, f=1/W no inverses and holds ~1/W of them; bytes
    per step of ResNet-50's factors are the upper triangles' over the factor interval."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    scale = importlib.import_module("distributed_scale")
    costs = scale.Costs(1e13, 1e-11, 1e-10, 25e9, 5e-6)
    layers = scale.resnet50_layers()
    assert len(layers) == 54
    replicated = scale.predict(layers, 8, 1.0, costs, 32, intervals=(10, 100))
    owner_only = scale.predict(layers, 8, 1 / 8, costs, 32, intervals=(10, 100))
    assert replicated["bytes"]["gradients"] == 0 and owner_only["bytes"]["inverses"] == 0
    assert owner_only["inverse_memory_bytes"] < replicated["inverse_memory_bytes"] / 4
    triangles = sum(x.d_in * (x.d_in + 1) // 2 + x.d_out * (x.d_out + 1) // 2 for x in layers)
    assert replicated["bytes"]["factors"] == triangles * 4 / 10
    assert replicated["step_s"] > replicated["sgd_step_s"]


def test_inverse_methods_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Two small sizes: every method timed, Cholesky exact in float64, Newton-Schulz converged."""
    result = bench["inverse_methods"].main(["--quick", "--reps", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "inverse_methods.json").read_text())
    assert [(r["n"], r["dtype"]) for r in saved["records"]] == [
        (31, "float32"),
        (31, "float64"),
        (65, "float32"),
        (65, "float64"),
    ]
    for record in result["records"]:
        for method in ("matmul", "cholesky", "cholesky_batched", "lu", "eigh", "newton_schulz_1"):
            assert math.isfinite(record[f"{method}_ms"]) and record[f"{method}_ms"] > 0
        tolerance = 1e-5 if record["dtype"] == "float32" else 1e-12
        assert record["cholesky_error"] < tolerance and record["eigh_error"] < 10 * tolerance
        assert record["newton_schulz_1_iters"] >= 1 and record["newton_schulz_1_error"] < 1e-2
    text = (tmp_path / "inverse_methods.md").read_text()
    assert saved["command"] in text and "| 65 | float64 |" in text
    sets = saved["factor_sets"]
    assert [r["dtype"] for r in sets] == ["float32", "float64"]
    assert sets[0]["max_difference"] < 1e-5 and sets[1]["max_difference"] < 1e-12
    assert (
        sets[0]["sizes"] == [9, 17, 9, 16, 8, 16]
        and sets[0]["per_factor_ms"] > 0
        and sets[0]["grouped_ms"] > 0
    )
    assert "Autoencoder factor set (6 factors" in text


def test_step_cost_compiled_twin(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """--compile times each K-FAC variant's compiled twin next to it (dynamo alone: 'eager', fast)."""
    argv = ["--quick", "--models", "mlp", "--reps", "1", "--optimizers", "kfac", "--compile", "eager"]
    result = bench["step_cost"].main([*argv, "--out", str(tmp_path), "--name", "twin"])
    optimizers = result["runs"][0]["optimizers"]
    assert set(optimizers) == {"kfac", "kfac compiled (eager)"}
    compiled = optimizers["kfac compiled (eager)"]
    assert compiled["speedup_vs_eager_paired_median"] > 0 and compiled["warmup_s"] > 0
    assert "| kfac compiled (eager) |" in (tmp_path / "twin.md").read_text()


def test_race_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Tiny workloads: Adam, SGD and the preset from the same start and batches; tables and plot written."""
    argv = ["--quick", "--budget", "0.5", "--evals", "2", "--workloads", "autoencoder", "transformer"]
    argv += ["--optimizers", "adam", "sgd", "kfac-auto", "--out", str(tmp_path)]
    result = bench["race"].main(argv)
    saved = json.loads((tmp_path / "race.json").read_text())
    assert saved["command"] == result["command"] and saved["clock"] == "cpu"
    assert [w["name"] for w in saved["workloads"]] == ["autoencoder", "transformer"]
    for work in saved["workloads"]:
        assert {run["optimizer"] for run in work["runs"]} == {"adam", "sgd", "kfac-auto"}
        # Same initialization: every run starts from the same held-out loss.
        assert len({run["curve"][0]["loss"] for run in work["runs"]}) == 1
        for run in work["runs"]:
            assert run["steps"] >= 1 and run["train_seconds"] >= 0.5
            assert all(math.isfinite(p["loss"]) for p in run["curve"])
        assert "kfac-auto" in work["summary"]["best"]
    text = (tmp_path / "race.md").read_text()
    assert "| kfac-auto |" in text and "| adam |" in text and "kfac-auto's time / adam's time" in text
    assert (tmp_path / "race.png").read_bytes()[:8] == PNG_MAGIC


def test_a_failed_kfac_jax_run_is_a_note_not_the_end_of_the_race(
    bench: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kfac-jax's subprocess failing (kfac-jax 0.0.8 under jax 0.10) leaves the other runs' tables."""
    race = bench["race"]

    def fail(name: str, args: object) -> None:
        raise subprocess.CalledProcessError(1, ["race_kfac_jax.py"])

    monkeypatch.setattr(race, "kfac_jax_missing", lambda: None)
    monkeypatch.setattr(race, "train_kfac_jax", fail)
    argv = ["--quick", "--budget", "0.3", "--evals", "2", "--workloads", "autoencoder"]
    result = race.main([*argv, "--optimizers", "adam", "kfac-jax", "--out", str(tmp_path)])
    (work,) = result["workloads"]
    assert [run["optimizer"] for run in work["runs"]] == ["adam"]
    assert work["notes"] == ["kfac-jax failed (exit status 1; its traceback is in the race's output)"]
    assert "kfac-jax failed" in (tmp_path / "race.md").read_text()


def test_a_race_run_of_the_preset_is_repeatable_step_for_step(bench: dict[str, ModuleType]) -> None:
    """The MC Fisher's labels come from the run's seed, whatever the worker process drew before."""
    race = bench["race"]
    args = race.parse_args(["--quick", "--budget", "30", "--max-steps", "3"])
    args.evals = 10**6  # an evaluation after every step (--quick caps the option)
    first = race.train_torch("autoencoder", "kfac-auto", {}, args)
    torch.rand(1000)  # a worker whose global generator moved on
    again = race.train_torch("autoencoder", "kfac-auto", {}, args)
    assert first["steps"] == again["steps"] == 3
    assert [p["steps"] for p in first["curve"]] == [0, 1, 2, 3]  # evaluated after every step
    assert [p["loss"] for p in first["curve"]] == [p["loss"] for p in again["curve"]]


def test_a_time_to_loss_run_of_the_preset_is_repeatable_step_for_step(bench: dict[str, ModuleType]) -> None:
    """As in the race: the MC Fisher's labels come from the run's seed, not from the runs before."""
    ttl = bench["time_to_loss"]
    args = ttl.parse_args(["--quick", "--workloads", "autoencoder", "--budget", "0.5"])
    args.evals = 10**6  # an evaluation after every step (--quick caps the option)
    work = ttl.make_workloads(args)[0]
    hparams = work.grids["kfac-auto"][0]  # with its batch size
    runs = []
    for _ in range(2):
        run = ttl.train_run(work, "kfac-auto", hparams, torch.device("cpu"), args)
        runs.append({p["steps"]: p["loss"] for p in run["curve"]})
        torch.rand(1000)  # the process's global generator moves on between runs
    common = sorted(set(runs[0]) & set(runs[1]))
    assert len(common) >= 3  # the initial point and at least two steps
    assert [runs[0][k] for k in common] == [runs[1][k] for k in common]


def test_race_exports_the_same_batches_to_every_optimizer(bench: dict[str, ModuleType]) -> None:
    """The batch indices depend on the seed only, not on the optimizer or the call."""
    race = bench["race"]
    args = race.parse_args(["--quick"])
    work = race.make_workload("autoencoder", args)
    first, again = race.batch_indices(work, 5, 0), race.batch_indices(work, 5, 0)
    assert first.shape == (5, work.batch_size) and (first == again).all()
    assert not (race.batch_indices(work, 5, 1) == first).all()


def test_per_step_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Tiny transformer: every run from the same start, evaluated every 3 steps, Adam the yardstick."""
    argv = ["--quick", "--steps", "6", "--every", "3", "--out", str(tmp_path)]
    result = bench["per_step"].main(argv)
    saved = json.loads((tmp_path / "per_step.json").read_text())
    assert saved["command"] == result["command"] and saved["steps"] == 6
    (work,) = saved["workloads"]
    assert [run["optimizer"] for run in work["runs"]] == ["adam", "kfac", "kfac-auto"]
    assert len({run["losses"][0] for run in work["runs"]}) == 1  # same initialization
    for run in work["runs"]:
        assert len(run["losses"]) == 3 and all(math.isfinite(v) for v in run["losses"])
        assert run["ms_per_step"] > 0
    adam_row = work["summary"]["rows"][0]
    assert work["summary"]["target"] == work["runs"][0]["losses"][-1]
    assert adam_row["advantage"] == adam_row["cost_ratio"] == adam_row["time_ratio"] == 1.0
    text = (tmp_path / "per_step.md").read_text()
    assert "## transformer" in text and "| kfac-auto |" in text and "| step 6 |" in text


def test_accumulation_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """The preset in one pass and in 2 accumulated micro-batches, from the same start and batches."""
    argv = ["--quick", "--workloads", "autoencoder", "--steps", "4", "--every", "2", "--out", str(tmp_path)]
    result = bench["accumulation"].main(argv)
    saved = json.loads((tmp_path / "accumulation.json").read_text())
    assert saved["command"] == result["command"] and saved["micro"] == 2
    one, accumulated = saved["workloads"]["autoencoder"].values()
    assert len(one) == len(accumulated) == 3 and one[0] == accumulated[0]  # same initialization
    assert all(math.isfinite(v) for v in one + accumulated) and one[1:] != accumulated[1:]
    assert "| 2 micro-batches |" in (tmp_path / "accumulation.md").read_text()


def test_per_step_refuses_a_grid_without_adam(
    bench: dict[str, ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench["per_step"].parse_args(["--grid", '[["kfac", {"lr": 0.1}]]'])
    assert "--grid needs an adam run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench["per_step"].parse_args(["--steps", "25", "--every", "10"])
    assert "must be a multiple of --every" in capsys.readouterr().err


def test_per_step_summary(bench: dict[str, ModuleType]) -> None:
    """The best Adam run's last loss is the target; advantage, cost and time ratio follow from it."""
    every = 10

    def run(kind: str, lr: float, losses: list[float], ms: float) -> dict:
        return {"optimizer": kind, "hparams": {"lr": lr}, "losses": losses, "ms_per_step": ms}

    runs = [
        run("adam", 1e-3, [9.0, 8.0, 7.0, 6.0, 5.5], 10.0),
        run("adam", 3e-3, [9.0, 7.0, 6.0, 5.0, 4.0], 12.0),  # the best: target 4.0 at step 40
        run("kfac", 0.1, [9.0, 5.0, 3.9, 3.0, 2.0], 36.0),  # at the target by step 20
        run("kfac-auto", 0.0, [9.0, 8.0, 7.0, 6.0, 5.0], 50.0),  # never reaches it
    ]
    summary = bench["per_step"].summarize(runs, steps=40, every=every)
    assert summary["target"] == 4.0 and summary["adam"] == {"lr": 3e-3} and summary["adam_steps"] == 40
    rows = summary["rows"]
    assert [r["steps_to_target"] for r in rows] == [None, 40, 20, None]
    assert rows[2]["advantage"] == 2.0 and rows[2]["cost_ratio"] == 3.0 and rows[2]["time_ratio"] == 1.5
    assert rows[1]["time_ratio"] == 1.0
    assert rows[3]["advantage"] is None and rows[3]["time_ratio"] is None
    assert rows[3]["cost_ratio"] == pytest.approx(50 / 12)


def test_initial_damping_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Two fixed dampings and 'auto' on the LSTM for two steps; the best fixed and auto's choice written."""
    argv = ["--cases", "lstm", "--steps", "2", "--seeds", "1", "--grid", "1e-3", "1", "--out", str(tmp_path)]
    result = bench["initial_damping"].main(argv)
    saved = json.loads((tmp_path / "initial_damping.json").read_text())
    (case,) = saved["cases"]
    assert set(case["runs"]) == {"0.001", "1.0", "auto"}
    assert case["best_fixed"] == min((1e-3, 1.0), key=lambda d: case["median"][str(d)])
    (chosen,) = case["auto_dampings"]
    assert chosen > 0 and case["auto_over_best"] == pytest.approx(chosen / case["best_fixed"])
    text = (tmp_path / "initial_damping.md").read_text()
    assert result["command"] in text and "| auto chose |" in text and "| auto / best fixed |" in text


def test_presets_seeds_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """One row per workload and seed, the divergences counted from time_to_loss.py's runs."""
    out = tmp_path / "presets_seeds.md"
    argv = ["--quick", "--workloads", "autoencoder", "convnet", "--seeds", "0", "1", "--budget", "1"]
    diverged, total = bench["presets_seeds"].main([*argv, "--scratch", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert total == 4 and f"Diverged: {diverged} of 4 runs." in text
    for workload, seed in itertools.product(("autoencoder", "convnet"), (0, 1)):
        assert f"| {workload} | {seed} | " in text
    runs = []
    for workload in ("autoencoder", "convnet"):
        work = json.loads((tmp_path / f"ttl_{workload}" / "time_to_loss.json").read_text())["workloads"][0]
        runs += work["runs"] + work["other_seed_runs"]
    assert {run["optimizer"] for run in runs} == {"kfac-auto"} and len(runs) == 4
    assert diverged == sum(bool(run["diverged"]) for run in runs)


def _race_runs(budget: float, curves: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """race.json runs whose optimizers evaluated (seconds, loss) along `curves`."""
    runs = []
    for opt, points in curves.items():
        curve = [{"steps": i, "seconds": t, "loss": loss} for i, (t, loss) in enumerate(points)]
        runs.append(
            {
                "optimizer": opt,
                "hparams": {},
                "steps": len(points),
                "train_seconds": budget,
                "diverged": False,
                "final_loss": curve[-1]["loss"],
                "best_loss": min(p["loss"] for p in curve),
                "curve": curve,
            }
        )
    return runs


def test_race_seeds_verdicts(bench: dict[str, ModuleType]) -> None:
    """Each issue-9 target is decided from the times and losses of one race, undecided past the budget."""
    race, seeds = bench["race"], bench["race_seeds"]

    def work(name: str, targets: list[float], budget: float, curves: dict) -> dict:
        runs = _race_runs(budget, curves)
        return {
            "name": name,
            "budget_s": budget,
            "runs": runs,
            "summary": race.summarize(targets, budget, runs),
        }

    auto = work(
        "autoencoder",
        [],
        60.0,
        {
            "adam": [(0, 500), (30, 260), (60, 240)],
            "kfac-auto": [(0, 500), (15, 239), (60, 226)],
            "kfac-jax": [(0, 500), (20, 239), (60, 228)],
        },
    )
    rows = {r["target"]: r for r in seeds.verdicts(auto)}
    adam, jax, loss = rows.values()
    assert adam["value"] == pytest.approx(15 / 60) and adam["met"] is True
    assert jax["value"] == pytest.approx(15 / 20) and jax["met"] is False
    assert loss["met"] is True and loss["cell"] == "226 vs 228"
    # The convnet: Adam does not reach 0.4 within the budget.
    conv = work("convnet", [0.4], 30.0, {"adam": [(0, 2.3), (30, 0.41)], "kfac-auto": [(0, 2.3), (18, 0.39)]})
    (row,) = seeds.verdicts(conv)
    assert row["value"] is None and row["met"] is True  # 18 s <= 2/3 of 30 s: below 2/3 of any later time
    conv = work("convnet", [0.4], 30.0, {"adam": [(0, 2.3), (30, 0.41)], "kfac-auto": [(0, 2.3), (25, 0.39)]})
    assert seeds.verdicts(conv)[0]["met"] is None
    conv = work("convnet", [0.4], 30.0, {"adam": [(0, 2.3), (20, 0.39)], "kfac-auto": [(0, 2.3), (30, 0.45)]})
    assert seeds.verdicts(conv)[0]["met"] is False
    tr = work("transformer", [], 30.0, {"adam": [(0, 4.2), (30, 4.11)], "kfac-auto": [(0, 4.2), (30, 4.15)]})
    assert seeds.verdicts(tr)[0]["met"] is False


def test_race_seeds_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """One race per seed, then a row per seed and the medians; --from re-reads the same races."""
    argv = ["--quick", "--budget", "0.3", "--evals", "2", "--workloads", "autoencoder"]
    argv += ["--optimizers", "adam", "kfac-auto", "--seeds", "0", "1"]
    summary = bench["race_seeds"].main([*argv, "--scratch", str(tmp_path / "s"), "--out", str(tmp_path)])
    assert set(summary["seeds"]) == {"0", "1"}
    for seed in (0, 1):
        race_json = json.loads((tmp_path / "s" / f"seed-{seed}" / "race.json").read_text())
        assert race_json["seed"] == seed
    text = (tmp_path / "race_seeds.md").read_text()
    assert "| 0 | " in text and "| 1 | " in text and "| all | " in text and "of 2" in text
    # Seeds read from --from are not run again (the scratch folder here is new and stays empty).
    sources = ["--from", str(tmp_path / "s" / "seed-0"), str(tmp_path / "s" / "seed-1")]
    again = bench["race_seeds"].main(
        [*sources, "--seeds", "0", "1", "--scratch", str(tmp_path / "new"), "--out", str(tmp_path / "r")]
    )
    assert again["seeds"] == summary["seeds"] and not (tmp_path / "new").exists()


def test_patch_sampling_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Steps of every configuration timed; drawn A statistics cheaper than exact ones and not exact."""
    argv = ["--quick", "--steps", "2", "--reps", "3", "--values", "1", "--out", str(tmp_path)]
    result = bench["patch_sampling"].main(argv)
    saved = json.loads((tmp_path / "patch_sampling.json").read_text())
    assert saved["command"] == result["command"]
    assert set(saved["steps"]) == {"preset, patches_per_dim=None", "preset, patches_per_dim=1.0", "adam"}
    assert all(r["median_ms"] > 0 for r in saved["steps"].values())
    for row in saved["statistics"].values():
        assert row["None"]["relative_error"] == 0.0 and row["1.0"]["relative_error"] > 0.0
        assert row["patches"] > row["dim"]
    assert "| adam |" in (tmp_path / "patch_sampling.md").read_text()


def test_step_breakdown_quick(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    """Every part of the preset's step timed on every workload, within the step."""
    argv = ["--quick", "--steps", "5", "--warmup", "2", "--out", str(tmp_path)]
    result = bench["step_breakdown"].main(argv)
    saved = json.loads((tmp_path / "step_breakdown.json").read_text())
    assert saved["command"] == result["command"]
    assert [w["name"] for w in saved["workloads"]] == ["autoencoder", "convnet", "transformer"]
    for w in saved["workloads"]:
        assert w["steps"] == 5 and w["adam_ms"] > 0
        parts = w["parts_ms"]
        assert list(parts) == [label for label, _, _ in bench["step_breakdown"].PARTS] + ["rest"]
        # Each is called in 5 steps (inverses and the loss after the step once, at step 5).
        assert all(parts[k] > 0 for k in parts if k != "rest"), parts
        assert 0 < parts["rest"] < w["step_ms"]  # the parts, each counted once, leave a remainder
    assert "| quadratic model |" in (tmp_path / "step_breakdown.md").read_text()


def test_step_breakdown_times_adam_on_a_model_without_kfac_hooks(bench: dict[str, ModuleType]) -> None:
    """Adam's model is a copy of the same initialisation that K-FAC never hooked."""
    args = bench["step_breakdown"].parse_args(["--quick"])
    work = bench["race"].make_workload("autoencoder", args)
    preset, adam = bench["step_breakdown"].build_trainers(work, 0)
    assert any(m._forward_hooks for m in preset.model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in adam.model.modules())
    for p, q in zip(preset.model.parameters(), adam.model.parameters(), strict=True):
        assert torch.equal(p, q) and p is not q


def test_step_breakdown_counts_a_part_without_the_parts_it_calls(bench: dict[str, ModuleType]) -> None:
    """A timed method that calls another timed one is charged its own time only."""

    def busy(seconds: float) -> None:
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    class Work:
        def inner(self) -> None:
            busy(0.05)

        def outer(self) -> None:
            busy(0.02)
            self.inner()

    work, timer = Work(), bench["step_breakdown"].PartTimer()
    timer.wrap(work, "inner", "inner")
    timer.wrap(work, "outer", "outer")
    work.outer()
    assert timer.totals["inner"] == pytest.approx(0.05, abs=0.01)
    assert timer.totals["outer"] == pytest.approx(0.02, abs=0.01)
    assert "inner" in vars(work) and vars(Work)["inner"].__name__ == "inner"  # the class is untouched


def test_batch_size_option_sets_every_workloads_batch(bench: dict[str, ModuleType]) -> None:
    """`--batch-size` replaces each workload's own batch size (per_step.py passes it on)."""
    race, per_step = bench["race"], bench["per_step"]
    for name in race.WORKLOADS:
        assert race.make_workload(name, race.parse_args(["--quick", "--batch-size", "5"])).batch_size == 5
        assert race.make_workload(name, race.parse_args(["--quick"])).batch_size != 5
    args = per_step.parse_args(["--quick", "--batch-size", "5"])
    assert race.parse_args(per_step.race_options(args)).batch_size == 5


def test_the_benchmark_transformer_looks_its_positions_up_per_example(bench: dict[str, ModuleType]) -> None:
    """The race's language model gives each sequence its own lookup of the position table, so the
    preset's block of the table sees per-example gradients: two steps raise no K-FAC warning about
    a lookup shared by the batch or about layers counting different examples."""
    common = bench["common"]
    torch.manual_seed(0)
    model = common.TinyTransformerLM(vocab=11, width=16, depth=1, heads=2, context=8)
    opt = common.make_trainer("kfac-auto", model, common.token_ce, {}).optimizer
    windows = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(1))
    x, y = windows[:, :-1], windows[:, 1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            loss = common.token_ce(model(x), y)
            loss.backward()
            opt.step(loss=loss, batch=(x, y))
    assert not layout_warnings(caught)
    assert opt.preconditioner.blocks["pos"].has_factors()
