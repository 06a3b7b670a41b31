"""MkDocs hooks: tables generated from the code, and the benchmark results included at build time.

Markers in the Markdown pages are replaced when the site is built:

* `<!-- options-table: KFAC -->` (or `KFACPreconditioner`): every constructor argument with its
  default, read from the signature, and its effect, read from the class docstring's Args section;
* `<!-- supported-layers -->`: the module types registered in `torch_kfac.blocks` and their blocks;
* `<!-- block-modules -->`: an API-reference entry for every module of `torch_kfac.blocks`;
* `<!-- benchmark-scripts -->`: every `benchmarks/*.py` script with its docstring's summary and command;
* `<!-- benchmark-results -->`: every `benchmarks/results/*.md` file, so the page picks up new
  results without an edit.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.torch_kfac")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCKS = ROOT / "src" / "torch_kfac" / "blocks"
_MARKER = re.compile(
    r"<!--\s*(options-table|supported-layers|benchmark-results|benchmark-scripts|block-modules)"
    r"\s*:?\s*(\w*)\s*-->"
)
#: Arguments whose docstring entry lives elsewhere (an alias) or says too little for a table.
_EXTRA = {
    "learning_rate": "alias of `lr`, the original port's name; `opt.learning_rate` reads and sets it.",
}


def parse_args_section(doc: str) -> dict[str, str]:
    """Argument name -> description from a Google-style "Args:" section (entries may name several)."""
    entries: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return entries
    indent = len(lines[start]) - len(lines[start].lstrip())
    names: list[str] = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # the end of the section
        entry = re.match(rf"^\s{{{indent + 1},{indent + 4}}}(\**[\w, ]+):\s*(.*)$", line)
        if entry and all(n.strip().lstrip("*").isidentifier() for n in entry.group(1).split(",")):
            names = [n.strip() for n in entry.group(1).split(",")]  # '*args' entries end the one before
            for name in names:
                entries[name] = entry.group(2).strip()
        elif names and line.strip():
            for name in names:
                entries[name] = f"{entries[name]} {line.strip()}".strip()
    return entries


def _format_default(value: Any) -> str:
    """A default value as it would be written in code."""
    if value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, float) and value == float("inf"):
        return "`math.inf`"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def options_table(class_name: str) -> str:
    """Markdown table of the constructor arguments of `torch_kfac.<class_name>`."""
    import torch_kfac
    from torch_kfac import options

    cls = getattr(torch_kfac, class_name)
    docs = parse_args_section(inspect.getdoc(options.PreconditionerOptions) or "")
    if class_name == "KFAC":
        docs.update(parse_args_section(inspect.getdoc(options.KFACOptions) or ""))
        docs["update_cov_manually"] = docs["update_factors_manually"]
    docs.update(parse_args_section(inspect.getdoc(cls) or ""))
    rows = ["| argument | default | kind | effect |", "|---|---|---|---|"]
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        text = _EXTRA.get(name) or docs.get(name, "")
        if not text:
            log.info("torch_kfac docs: no docstring entry for %s(%s)", class_name, name)
            text = "see the API reference"
        kind = "keyword-only" if param.kind is param.KEYWORD_ONLY else "positional or keyword"
        rows.append(f"| `{name}` | {_cell(_format_default(param.default))} | {kind} | {_cell(text)} |")
    return "\n".join(rows)


def _qualified(cls: type) -> str:
    """`nn.Linear` for torch's modules, the full dotted name for others."""
    if cls.__module__.startswith("torch.nn."):
        return f"nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def supported_layers() -> str:
    """Markdown table of the module types with a registered curvature block."""
    from torch_kfac import blocks

    registry: dict[type, type] = getattr(blocks, "_REGISTRY", {})
    rows = ["| module | block | what the block keeps |", "|---|---|---|"]
    for module_type, block_type in registry.items():
        summary = (inspect.getdoc(block_type) or "").split("\n\n")[0].replace("\n", " ")
        rows.append(f"| `{_qualified(module_type)}` | `{block_type.__name__}` | {_cell(summary)} |")
    return "\n".join(rows)


def block_modules() -> str:
    """mkdocstrings directives for every module in src/torch_kfac/blocks (but the package and base)."""
    stems = sorted(p.stem for p in BLOCKS.glob("*.py") if p.stem not in ("__init__", "base"))
    return "\n\n".join(f"::: torch_kfac.blocks.{stem}" for stem in stems)


def _demote_headings(text: str) -> str:
    """Push every Markdown heading one level down (the included file sits under a page heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"^#{1,5} ", line) else line)
    return "\n".join(out)


def _unlink_relative(text: str) -> str:
    """Relative links in included files point outside the site: keep their text, drop the link."""
    text = re.sub(r"!\[[^\]]*\]\((?!https?://)([^)]+)\)", r"(figure: `benchmarks/results/\1`)", text)
    return re.sub(r"\[([^\]]+)\]\((?!https?://|#)[^)]+\)", r"\1", text)


def benchmark_scripts() -> str:
    """Markdown table of the benchmark scripts: summary line and run command from each docstring."""
    rows = ["| script | measures | run |", "|---|---|---|"]
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        command = re.search(r"(python benchmarks/\S+\.py)", doc)
        if not doc or command is None:
            continue  # helpers (no command in their docstring)
        summary = doc.split("\n\n")[0].replace("\n", " ")
        rows.append(f"| `benchmarks/{path.name}` | {_cell(summary)} | `{command.group(1)}` |")
    return "\n".join(rows)


def benchmark_results() -> str:
    """The contents of every benchmarks/results/*.md file, or a note that there are none yet."""
    files = sorted(RESULTS.glob("*.md")) if RESULTS.is_dir() else []
    if not files:
        return (
            '!!! note "No results yet"\n    No `benchmarks/results/*.md` file was present when this site '
            "was built. Run the benchmarks (see above) and rebuild the site to include them here."
        )
    parts = []
    for path in files:
        body = _unlink_relative(_demote_headings(path.read_text(encoding="utf-8").strip()))
        if not body.startswith("#"):
            body = f"## {path.stem.replace('_', ' ').capitalize()}\n\n{body}"
        parts.append(f"{body}\n\n*From `benchmarks/results/{path.name}`.*\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the markers of this page by the generated Markdown."""

    def replace(match: re.Match[str]) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "options-table":
            return options_table(arg or "KFAC")
        if kind == "supported-layers":
            return supported_layers()
        if kind == "block-modules":
            return block_modules()
        if kind == "benchmark-scripts":
            return benchmark_scripts()
        return benchmark_results()

    return _MARKER.sub(replace, markdown)
