"""Every documented command works from a fresh clone (issue 33): each ``make`` command the docs
show resolves in the Makefile and reaches its first real step, and every script the Makefile
runs carries its run bit in git (a fresh clone has only what git recorded)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "deploy" / "README.md",
        ROOT / "benchmarks" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)

#: What ``make -n`` must print for each documented target, from a fresh clone (no venv): its
#: setup steps, then its own command. A target the docs start to show needs an entry here.
SETUP_SERVE = ["python3 -m venv", "scripts/install.sh --python"]
SETUP = [*SETUP_SERVE, "--dev --editable", "scripts/system-deps.sh", "compat_sources --fetch"]
EXPECTED = {
    "serve": [*SETUP_SERVE, "-m vllm.entrypoints.openai.api_server --model"],
    "test": [*SETUP, "-m pytest"],
    "setup-serve": SETUP_SERVE,
    "setup": SETUP,
    "lint": [*SETUP, "-m ruff check .", "-m ruff format --check ."],
    "fmt": [*SETUP, "-m ruff check --fix .", "-m ruff format ."],
    "bench": [*SETUP, "-m benchmarks"],
    "bench-quality": [*SETUP, "-m loadtest.quality --start-server"],
    "bench-decode": [*SETUP, "-m loadtest.decode --start-server"],
    "bench-sessions": [*SETUP, "-m loadtest.sessions --start-server"],
    "eval": [*SETUP, "-m benchmarks.eval"],
    "eval-paired": [*SETUP, "-m benchmarks.paired"],
    "loadtest": [*SETUP, "-m loadtest"],
    "image-test": ["scripts/system-deps.sh", "scripts/image-test.sh"],
    "clean": ["rm -rf"],
    "help": ["echo"],
}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_MAKE = re.compile(r"`(make [^`\n]+)`")


def documented_make_commands() -> dict[str, list[str]]:
    """``{command: [files that show it]}``: inline ``make ...`` spans and ``make ...`` lines
    of fenced blocks, in every page of the docs."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        commands = INLINE_MAKE.findall(FENCE.sub("", text))
        for block in FENCE.findall(text):
            commands += [ln.strip() for ln in block.splitlines() if ln.strip().startswith("make ")]
        for cmd in commands:
            cmd = shlex.join(shlex.split(cmd, comments=True))
            found.setdefault(cmd, []).append(str(doc.relative_to(ROOT)))
    return found


COMMANDS = documented_make_commands()


def test_the_docs_show_the_first_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = FENCE.search(readme).group(1).splitlines()
    assert [ln.split()[:2] for ln in first_block[:2]] == [["make", "serve"], ["make", "test"]]
    assert {"make serve", "make test"} <= set(COMMANDS)


def _targets(cmd: str) -> list[str]:
    return [a for a in shlex.split(cmd)[1:] if "=" not in a and not a.startswith("-")]


def test_every_documented_target_is_checked() -> None:
    targets = {t for cmd in COMMANDS for t in _targets(cmd)}
    unknown = sorted(targets - set(EXPECTED))
    assert not unknown, f"documented make targets without an expectation here: {unknown}"
    assert targets, "no make command found in the docs"


def _module_file(module: str) -> bool:
    base = ROOT / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_documented_make_command_resolves(cmd: str, tmp_path: Path) -> None:
    """``make -n`` of the command as documented, with the venv in an empty folder (a fresh
    clone: every setup step is due). Nothing is run; the recipe must reach its own command."""
    argv = shlex.split(cmd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env["CAOTE_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        ["make", "-n", f"VENV={tmp_path / 'venv'}", *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    where = ", ".join(COMMANDS[cmd])
    assert proc.returncode == 0, f"`{cmd}` ({where}): make -n exit {proc.returncode}\n{proc.stderr}"
    out = proc.stdout
    for target in _targets(cmd):
        pos = 0
        for step in EXPECTED[target]:
            at = out.find(step, pos)
            assert at >= 0, f"`{cmd}` ({where}): no `{step}` (in order) in make -n:\n{out}"
            pos = at
    # what it would run of this repository exists: modules, and scripts with their run bit
    for module in re.findall(r"-m (vllm_caote[\w.]*)", out):
        assert _module_file(module), f"`{cmd}`: make would run module {module}, which is missing"
    scripts = sorted(set(re.findall(r"(?:^|[\s;&|])((?:scripts|deploy|\.ci)/[\w./-]+\.sh)", out)))
    for script in scripts:
        assert _git_mode(script) == "100755", f"`{cmd}`: {script} lacks its run bit in git"


def _git_mode(path: str) -> str | None:
    out = subprocess.run(
        ["git", "ls-files", "-s", path], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] if out else None


def test_scripts_the_makefile_runs_are_executable_in_git() -> None:
    """A fresh clone runs what the Makefile executes directly (``scripts/x.sh`` at the start of
    a recipe line): each must carry its run bit in git, not only in this working tree. So does
    CI's entry point."""
    recipe = re.compile(r"^\t(?:@)?((?:scripts|\.ci|deploy)/[\w./-]+)", re.M)
    run = sorted(set(recipe.findall((ROOT / "Makefile").read_text())))
    assert "scripts/install.sh" in run and "scripts/image-test.sh" in run, run
    for path in [*run, ".ci/run"]:
        assert _git_mode(path) == "100755", f"{path} is committed without its run bit"
