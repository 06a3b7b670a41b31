"""Write the mutation-testing report from a mutmut results list and the survivors' verdicts.

    python scripts/mutation_report.py RESULTS VERDICTS [--out benchmarks/results/mutation.md]

RESULTS is the list `scripts/mutation.sh` writes (`name: status` per mutant); VERDICTS a
tab-separated file with one line per survived or "no tests" mutant: name, verdict (killed,
equivalent, fixed, not-observable, distributed-only, open) and detail (the killing test, or the
reason). "fixed": the mutant behaved better than the code, which was then fixed and tested;
"open": an observable difference no test checks yet.
Every survivor must have a verdict; the script fails naming those that have none.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

VERDICTS = ("killed", "equivalent", "fixed", "not-observable", "distributed-only", "open")
NOT_KILLED = ("survived", "no tests")


def read_results(path: Path) -> dict[str, str]:
    """mutant name -> mutmut status."""
    results = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, status = line.rsplit(": ", 1)
            results[name.strip()] = status.strip()
    return results


def read_verdicts(path: Path) -> dict[str, tuple[str, str]]:
    """mutant name -> (verdict, detail); unknown verdicts are refused."""
    verdicts = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, verdict, detail = [*line.split("\t"), "", ""][:3]
        if verdict not in VERDICTS:
            raise SystemExit(f"{path}:{number}: unknown verdict {verdict!r} (expected one of {VERDICTS})")
        verdicts[name.strip()] = (verdict, detail.strip())
    return verdicts


def module_of(name: str) -> str:
    """'torch_kfac.optimizer.xǁKFACǁstep__mutmut_3' -> 'optimizer'."""
    return name.split(".")[1]


def function_of(name: str) -> str:
    """The mutated function, as `Class.method` or `function`."""
    mangled = name.split(".", 2)[2].rsplit("__mutmut_", 1)[0]
    if mangled.startswith("xǁ"):
        cls, method = mangled[2:].split("ǁ", 1)
        return f"{cls}.{method}"
    return mangled.removeprefix("x_")


def short(name: str) -> str:
    """`module.function #n`, the name used in the tables."""
    return f"{module_of(name)}.{function_of(name)} #{name.rsplit('__mutmut_', 1)[1]}"


def score(killed: int, others: int) -> str:
    """killed / (killed + others) as a percentage."""
    return f"{100 * killed / (killed + others):.1f} %" if killed + others else "n/a"


def report(results: dict[str, str], verdicts: dict[str, tuple[str, str]], header: str) -> str:
    """The markdown report."""
    modules = sorted({module_of(n) for n in results})
    lines = [header.rstrip(), "", "## Results", ""]
    lines += [
        "| module | mutants | killed by the selection | survived | no tests | score of the run | "
        "killed by new tests | equivalent | fixed | not observable | distributed only | open | "
        "score after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for module in [*modules, None]:
        names = [n for n in results if module is None or module_of(n) == module]
        status = Counter(results[n] for n in names)
        verdict = Counter(verdicts[n][0] for n in names if results[n] in NOT_KILLED and n in verdicts)
        row = {
            "mutants": len(names),
            "killed": status["killed"],
            "survived": status["survived"],
            "no tests": status["no tests"],
        }
        label = "**all**" if module is None else module
        lost = row["survived"] + row["no tests"]
        after_killed = row["killed"] + verdict["killed"]
        lines.append(
            f"| {label} | {row['mutants']} | {row['killed']} | {row['survived']} | {row['no tests']} | "
            f"{score(row['killed'], lost)} | {verdict['killed']} | {verdict['equivalent']} | "
            f"{verdict['fixed']} | {verdict['not-observable']} | {verdict['distributed-only']} | "
            f"{verdict['open']} | "
            f"{score(after_killed, lost - verdict['killed'] - verdict['equivalent'] - verdict['fixed'])} |"
        )
    lines += [
        "",
        "Score of the run: killed / (killed + survived + no tests). Score after: mutants killed by "
        "the selection or by a new test, over all mutants that are neither equivalent nor fixed "
        "(argued-equivalent mutants, and those that exposed a bug since fixed and tested, leave the "
        "denominator; not-observable, distributed-only and open ones stay in it as not killed).",
        "",
        "## Every survivor",
        "",
        "| mutant | status in the run | verdict | test that kills it, or the reason |",
        "|---|---|---|---|",
    ]
    for name in sorted(n for n in results if results[n] in NOT_KILLED):
        verdict, detail = verdicts[name]
        cell = detail.replace("|", "\\|")
        lines.append(f"| `{short(name)}` | {results[name]} | {verdict} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Check that every survivor has a verdict, then write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("verdicts", type=Path)
    parser.add_argument("--header", type=Path, required=True, help="markdown put before the tables")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mutation.md"))
    args = parser.parse_args(argv)
    results, verdicts = read_results(args.results), read_verdicts(args.verdicts)
    missing = sorted(n for n, s in results.items() if s in NOT_KILLED and n not in verdicts)
    unknown = sorted(n for n in verdicts if n not in results)
    if missing or unknown:
        for n in missing:
            print(f"no verdict: {n}", file=sys.stderr)
        for n in unknown:
            print(f"verdict for a mutant not in the results: {n}", file=sys.stderr)
        raise SystemExit(1)
    args.out.write_text(report(results, verdicts, args.header.read_text()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
