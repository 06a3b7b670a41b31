"""The race (race.py) from several seeds: how the issue-9 targets fare across initializations and batches.

One race decides a target on one initialization, one batch order and one draw of sampled labels; the
convnet's held-out loss moves by 0.05-0.15 between evaluations, so one seed can meet a target that
another misses. This runs `race.py --seed s` for every seed (each into its own folder under
`--scratch`) that is not among the races already run and read from `--from DIR ...` (folders
holding a race.json), and writes per seed and workload the preset's (kfac-auto's) time to each
target over Adam's and kfac-jax's, the losses at the budget, the targets' verdicts and the medians
over seeds to `results/race_seeds.{json,md}`.

    python benchmarks/race_seeds.py [--seeds 0 1 2] [--from benchmarks/results] [race.py options]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import race
from common import RESULTS_DIR, machine_line, median, write_results

#: The issue-9 targets: (workload, kind, bound). 'adam'/'kfac-jax': kfac-auto's time to the target
#: named over that optimizer's time at most `bound`; 'loss-below': kfac-auto's loss at the budget
#: below that optimizer's.
TARGETS: dict[str, list[tuple[str, str, float]]] = {
    "autoencoder": [
        ("best Adam", "adam", 1 / 3),
        ("best Adam", "kfac-jax", 1 / 2),
        ("budget", "kfac-jax", 0.0),
    ],
    "convnet": [("0.4", "adam", 2 / 3)],
    "transformer": [("budget", "adam", 0.0)],
}


def target_name(work: dict[str, Any], prefix: str) -> str | None:
    """The summary's name of the target starting with `prefix` (None if the race has none)."""
    return next((t["name"] for t in work["summary"]["targets"] if t["name"].startswith(prefix)), None)


def budget_losses(work: dict[str, Any]) -> dict[str, float]:
    """Each optimizer's (best run's) held-out loss at the budget."""
    return {opt: race.loss_at(race.best_run(work, opt), work["budget_s"]) for opt in work["summary"]["best"]}


def time_verdict(work: dict[str, Any], name: str, other: str, bound: float) -> dict[str, Any]:
    """kfac-auto's time to target `name` over `other`'s, whether it is within `bound` (None:
    undecided), and the cell that shows both times."""
    best = work["summary"]["best"]
    target = f"time to {name} <= {bound:.2g}x {other}'s"
    if "kfac-auto" not in best or other not in best:
        return {"target": target, "value": None, "met": None, "cell": "n/a"}
    mine, theirs = best["kfac-auto"]["to_target"][name], best[other]["to_target"][name]
    cell = (f"{mine['seconds']:.1f}" if mine else "not reached") + (
        f" / {theirs['seconds']:.1f}" if theirs else " / not reached"
    )
    ratio, met = None, None
    if mine and theirs and theirs["seconds"] > 0:
        ratio = mine["seconds"] / theirs["seconds"]
        met = ratio <= bound
        cell += f" = **{ratio:.2f}x**"
    elif mine and not theirs:
        # The other optimizer's time is past the budget: the ratio is below mine / budget.
        met = True if mine["seconds"] / work["budget_s"] <= bound else None
    elif theirs and not mine:
        met = False
    return {"target": target, "value": ratio, "met": met, "cell": cell}


def verdicts(work: dict[str, Any]) -> list[dict[str, Any]]:
    """The workload's targets: what was measured and whether it was met (None: undecided)."""
    rows = []
    losses = budget_losses(work)
    for prefix, other, bound in TARGETS.get(work["name"], []):
        if prefix == "budget":
            mine, theirs = losses.get("kfac-auto", math.nan), losses.get(other, math.nan)
            met = mine < theirs if math.isfinite(mine) and math.isfinite(theirs) else None
            rows.append(
                {
                    "target": f"loss at budget below {other}'s",
                    "value": None,
                    "met": met,
                    "cell": f"{mine:.4g} vs {theirs:.4g}",
                }
            )
            continue
        name = target_name(work, prefix)
        if name is not None:
            rows.append(time_verdict(work, name, other, bound))
    return rows


def markdown(seeds: dict[int, dict[str, Any]], command: str) -> str:
    """Per workload: one row per seed with every target's measurement, then the medians."""
    first = next(iter(seeds.values()))
    lines = [
        "# The race from several seeds",
        "",
        f"Command: `{command}`",
        "",
        "Each seed is one `race.py --seed s` run: its own initialization, batch order and sampled "
        "labels; Adam and SGD the best of their grids in that race. A cell `a / b = r` is kfac-auto's "
        "time to the target over the other optimizer's (seconds of process CPU time). 'met': the "
        "issue-9 target holds in that race; 'undecided': a time is past the budget.",
        "",
        machine_line(first["environment"]).removesuffix(".") + " (the first seed's race).",
        "",
        "Load average (1 min) at the start and the end of each seed's race: "
        + "; ".join(
            f"seed {seed}: {r['environment']['load_average_at_start'][0]:.2f} to "
            f"{r['environment'].get('load_average_at_end', [math.nan])[0]:.2f}"
            for seed, r in seeds.items()
        )
        + ".",
        "",
    ]
    for w_index, work0 in enumerate(first["workloads"]):
        name = work0["name"]
        header = [v["target"] for v in verdicts(work0)]
        lines += [f"## {name} (budget {work0['budget_s']:g} s per run)", ""]
        lines.append("| seed | Adam's loss at budget | " + " | ".join(header) + " |")
        lines.append("|---:|---:|" + "---|" * len(header))
        ratios: dict[str, list[float]] = {h: [] for h in header}
        met_count: dict[str, int] = dict.fromkeys(header, 0)
        for seed, result in seeds.items():
            work = result["workloads"][w_index]
            rows = verdicts(work)
            adam = budget_losses(work).get("adam", math.nan)
            cells = []
            for row in rows:
                mark = {True: "met", False: "missed", None: "undecided"}[row["met"]]
                cells.append(f"{row['cell']} ({mark})")
                met_count[row["target"]] += bool(row["met"])
                if row["value"] is not None and math.isfinite(row["value"]):
                    ratios[row["target"]].append(row["value"])
            lines.append(f"| {seed} | {adam:.4g} | " + " | ".join(cells) + " |")
        summary = [
            f"median {median(ratios[h]):.3g} of {len(ratios[h])}, met in {met_count[h]} of {len(seeds)}"
            if ratios[h]
            else f"met in {met_count[h]} of {len(seeds)}"
            for h in header
        ]
        lines.append("| all | | " + " | ".join(summary) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or read) one race per seed and write the table across seeds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--from", dest="sources", type=Path, nargs="+", help="folders holding a race.json")
    parser.add_argument("--scratch", type=Path, default=Path(".scratch/race_seeds"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args, race_argv = parser.parse_known_args(argv)
    seeds: dict[int, dict[str, Any]] = {}
    for folder in args.sources or []:
        result = json.loads((folder / "race.json").read_text())
        # Races run before race.json recorded its seed: the seed of its command line.
        seed = result.get("seed", race.parse_args(shlex.split(result["command"])[2:]).seed)
        seeds[seed] = result
    for seed in args.seeds:
        if seed not in seeds:  # a seed read from --from is not run again
            out = args.scratch / f"seed-{seed}"
            race.main([*race_argv, "--seed", str(seed), "--out", str(out)])
            seeds[seed] = json.loads((out / "race.json").read_text())
    seeds = dict(sorted(seeds.items()))
    command = "python benchmarks/race_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(seeds, command.strip())
    summary = {
        "command": command.strip(),
        "seeds": {
            str(seed): {w["name"]: verdicts(w) for w in result["workloads"]} for seed, result in seeds.items()
        },
    }
    write_results(args.out, "race_seeds", summary, text)
    print(text)
    return summary


if __name__ == "__main__":
    main()
