"""Results people can navigate (issue #33.3): one folder per study under
``benchmarks/results/``, superseded ones under ``archive/``, an index that lists every report and
is current, no server logs or machine paths committed, and one provenance record (commit, dirty
state, command, date) that every report writer uses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import provenance, results_index

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|Users)/")


def _tracked(under: Path) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", str(under.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [ROOT / n for n in out.split("\0") if n and (ROOT / n).exists()]


def _study_folders() -> list[Path]:
    folders = {p.parent for p in _tracked(RESULTS) if p.parent != RESULTS}
    return sorted(f for f in folders if f != RESULTS / "archive")


def test_the_index_is_current():
    assert results_index.main(["--check"]) == 0, "run python -m benchmarks.results_index"


def test_the_index_lists_every_report_folder_and_report():
    index = (RESULTS / "README.md").read_text()
    targets = set(re.findall(r"\]\(([^)]+\.md)\)", index))
    folders = _study_folders()
    assert folders
    for folder in folders:
        main = folder / f"{folder.name}.md"
        assert main.is_file(), f"{folder.relative_to(ROOT)} has no report {main.name}"
        for md in folder.glob("*.md"):
            assert md.relative_to(RESULTS).as_posix() in targets, f"{md} is not in the index"


def test_one_folder_per_study_and_nothing_loose():
    loose = [p.name for p in _tracked(RESULTS) if p.parent == RESULTS and p.name != "README.md"]
    assert not loose, f"files outside a study folder: {loose}"
    for folder in _study_folders():
        assert len(folder.relative_to(RESULTS).parts) <= 2, folder  # <tag>/ or archive/<tag>/


def test_no_server_logs_or_machine_paths_committed():
    files = _tracked(RESULTS)
    logs = [p.name for p in files if p.suffix == ".log"]
    assert not logs, logs
    found = [
        str(p.relative_to(ROOT))
        for p in files
        if p.suffix in (".md", ".json") and MACHINE_PATH.search(p.read_text())
    ]
    assert not found, f"absolute machine paths in {found}"


def test_record_names_commit_dirty_state_command_and_date(monkeypatch):
    monkeypatch.delenv("CAOTE_PREFILL", raising=False)
    p = provenance.record("benchmarks.eval", ["--quick"])
    assert p["command"].endswith("python -m benchmarks.eval --quick")
    assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]), p["commit"]
    assert p["dirty"] == bool(p["changes"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["date"]), p["date"]


def test_record_outside_git_says_so(tmp_path):
    p = provenance.record("benchmarks", [], repo=tmp_path)
    assert p["commit"] is None and p["dirty"] is False
    assert "unknown" in provenance.markdown({"provenance": p})[2]


def test_markdown_lines_and_what_the_index_reads_of_them(tmp_path):
    p = dict(command="python -m loadtest --quick", commit="ab" * 20, dirty=True,
             changes=["vllm_caote/engine/step.py"], date="2026-12-04T10:00:00Z")  # fmt: skip
    lines = provenance.markdown({"provenance": p})
    assert lines[0] == "Command: `python -m loadtest --quick`"
    assert lines[2] == (
        "Commit: `abababababab` with uncommitted changes to `vllm_caote/engine/step.py`"
        " · Date: 2026-12-04T10:00:00Z"
    )
    # a result from before provenance: its own command only
    assert provenance.markdown({"command": "python -m x"}) == ["Command: `python -m x`", ""]
    report = tmp_path / "r.md"
    report.write_text("\n".join(["# A title", "", *lines, "body"]))
    row = results_index.parse(report, tmp_path)
    assert (row.command, row.commit, row.date) == (
        "`python -m loadtest --quick`",
        "`abababa` + uncommitted changes",
        "2026-12-04",
    )
    assert row.question == "A title"


def test_scrub_takes_this_machine_out():
    home = str(Path.home())
    text = f"{ROOT}/vllm_caote {ROOT.parent}/other-checkout {home}/.cache/x"
    out = provenance.scrub(text)
    assert out.startswith("./vllm_caote ../other-checkout ")
    assert str(ROOT) not in out and not MACHINE_PATH.search(out)


@pytest.mark.parametrize("tag", ["bench", "capacity_quality"])
def test_default_output_is_the_studys_folder(tag, tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "RESULTS", tmp_path)
    assert provenance.out_dir(None, tag) == tmp_path / tag and (tmp_path / tag).is_dir()
    assert provenance.out_dir(tmp_path / "x", tag) == tmp_path / "x"
