"""Where a report's numbers came from: commit, dirty state, command line, date.

Every benchmark records :func:`record` when it starts (``result["provenance"]``) and renders
:func:`markdown` under its report's title, so every report says the same things the same way:

    Command: `CAOTE_PREFILL=blockwise python -m loadtest.quality --start-server`

    Commit: `0123456789ab` with uncommitted changes to `vllm_caote/engine/step.py` · Date: 2026-12-04T10:33:12Z

A run on a dirty tree names the changed tracked files (what the run imported is not a commit).
:func:`scrub` takes this machine out of what is written: the repository becomes ``.``, its
parent ``..``, the home folder ``~``. Results go to ``benchmarks/results/<tag>/`` unless
``--out`` says otherwise (:func:`out_dir`); ``benchmarks/results/README.md`` indexes them
(``python -m benchmarks.results_index``). Imports neither vLLM nor torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAX_FILES = 8  # changed files named in a report (the JSON has them all)


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def command_line(module: str, argv=None) -> str:
    """The command line as run, led by the plugin's settings in force from the environment
    (``CAOTE_<SETTING>``, which a started engine or server reads too)."""
    from dataclasses import fields

    from vllm_caote.config import ENV_PREFIX, EvictionSettings

    names = sorted(ENV_PREFIX + f.name.upper() for f in fields(EvictionSettings))
    settings = [f"{k}={os.environ[k]}" for k in names if os.environ.get(k, "").strip()]
    args = list(sys.argv[1:] if argv is None else argv)
    return scrub(" ".join([*settings, f"python -m {module}", *args]))


def record(module: str, argv=None, repo: Path | None = None) -> dict:
    """Provenance of a run of ``python -m module argv`` on the checkout ``repo`` (default:
    this one): full commit (None outside git), dirty state and the tracked files changed,
    the command line, the UTC date."""
    repo = ROOT if repo is None else Path(repo)
    changes = sorted((_git(repo, "diff", "--name-only", "HEAD", "--") or "").splitlines())
    commit = _git(repo, "rev-parse", "HEAD") or None
    return {
        "command": command_line(module, argv),
        "commit": commit,
        "git_rev": commit[:7] if commit else None,  # the short form older reports carry
        "dirty": bool(changes),
        "changes": changes,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "checkout": scrub(str(repo.resolve())),
    }


def markdown(result: dict, note: str = "") -> list[str]:
    """The report's provenance lines (each followed by a blank line). A result recorded
    before provenance was kept has only its ``command``."""
    p = result.get("provenance")
    if p is None:
        command = result.get("command") or (result.get("config") or {}).get("command", "?")
        return [f"Command: `{command}`{note}", ""]
    commit = f"`{p['commit'][:12]}`" if p.get("commit") else "unknown (not a git checkout)"
    if p.get("dirty"):
        files = [f"`{f}`" for f in p["changes"][:MAX_FILES]]
        more = len(p["changes"]) - MAX_FILES
        commit += " with uncommitted changes to " + ", ".join(files + [f"{more} more"] * (more > 0))
    return [f"Command: `{p['command']}`{note}", "", f"Commit: {commit} · Date: {p['date']}", ""]


def scrub(text: str) -> str:
    """``text`` without this machine's absolute paths: the repository as ``.``, folders beside
    it as ``../name``, the home folder as ``~``."""
    home = str(Path.home())
    for path, short in ((str(ROOT), "."), (str(ROOT.parent), ".."), (home, "~")):
        if len(path) > 1:
            text = re.sub(re.escape(path) + r"(?=/|\b|$)", short, text)
    return text


def out_dir(out: str | Path | None, tag: str) -> Path:
    """Where a run's files go: ``out`` if given, else ``benchmarks/results/<tag>/``."""
    path = Path(out) if out else RESULTS / tag
    path.mkdir(parents=True, exist_ok=True)
    return path
