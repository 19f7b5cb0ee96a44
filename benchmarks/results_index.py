"""``python -m benchmarks.results_index``: write ``benchmarks/results/README.md``, the index of
every report, from the reports themselves.

One folder per study (``benchmarks/results/<tag>/``: the report ``<tag>.md``, its JSON data and
plots, and any sub-report such as a decode run's perplexity); superseded and tried-and-dropped
studies under ``archive/``. Each report's row: its question (the report's ``Question:`` line,
else its title), the command, the commit and the date (the ``Command:`` and ``Commit: ... ·
Date: ...`` lines that :func:`benchmarks.provenance.markdown` writes). ``--check`` exits 1 when
the committed index differs from what this would write (``tests/`` runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.provenance import RESULTS

INDEX = RESULTS / "README.md"
HEADER = """# Benchmark results

Every report in this folder, one folder per study (report, JSON data, plots); studies that a
later one superseded, and settings tried and dropped, are under [archive/](archive/). The
current answer to each question, with context, is in [docs/results.md](../../docs/results.md);
the tools are described in [benchmarks/README.md](../README.md). Written by `python -m
benchmarks.results_index` from the reports' `Question:`, `Command:` and `Commit: ... · Date:`
lines (the last two written by `benchmarks/provenance.py`); reports older than that helper
name the commit that added them instead of the one they ran on.
"""


@dataclass
class Report:
    path: Path  # relative to RESULTS
    title: str
    question: str
    command: str
    commit: str
    date: str


def _field(lines: list[str], name: str) -> str | None:
    prefix = name + ": "
    return next((ln[len(prefix) :].strip() for ln in lines if ln.startswith(prefix)), None)


def parse(path: Path, root: Path = RESULTS) -> Report:
    lines = path.read_text().splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), path.stem)
    command = _field(lines, "Command") or "not recorded"
    commit_line = _field(lines, "Commit") or "not recorded"
    commit, _, date = commit_line.partition(" · Date: ")
    sha = re.search(r"`([0-9a-f]{7,40})`", commit)
    if commit.startswith("not recorded") and sha:
        commit = f"not recorded (report added in `{sha.group(1)[:7]}`)"
    elif sha:
        commit = f"`{sha.group(1)[:7]}`" + (
            " + uncommitted changes" if "uncommitted" in commit else ""
        )
    return Report(
        path=path.relative_to(root),
        title=title,
        question=_field(lines, "Question") or title,
        command=command,
        commit=commit,
        date=date[:10] or "-",
    )


def reports(root: Path = RESULTS) -> list[Report]:
    """Every report under ``root`` (Markdown files in study folders), folder by folder, each
    folder's main report (``<folder>/<folder>.md``) first."""
    found = [p for p in root.rglob("*.md") if p != root / "README.md"]
    found.sort(key=lambda p: (p.parent.relative_to(root).parts, p.stem != p.parent.name, p.stem))
    return [parse(p, root) for p in found]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: list[Report]) -> list[str]:
    out = ["| report | question | command | commit | date |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        link = f"[{r.path.stem}]({r.path.as_posix()})"
        out.append(
            f"| {link} | {_cell(r.question)} | {_cell(r.command)} | {_cell(r.commit)} | {r.date} |"
        )
    return out


def render(root: Path = RESULTS) -> str:
    all_reports = reports(root)
    current = [r for r in all_reports if r.path.parts[0] != "archive"]
    archived = [r for r in all_reports if r.path.parts[0] == "archive"]
    lines = [HEADER, "## Current", "", *_table(current), ""]
    lines += ["## Archive (superseded, or tried and dropped)", "", *_table(archived), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--check", action="store_true", help="exit 1 if the index is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not INDEX.exists() or INDEX.read_text() != text:
            print(
                f"{INDEX} is out of date: run python -m benchmarks.results_index", file=sys.stderr
            )
            return 1
        return 0
    INDEX.write_text(text)
    print(f"wrote {INDEX} ({len(reports())} reports)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
