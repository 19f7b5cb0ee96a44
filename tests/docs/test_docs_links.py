"""The documentation holds together: every relative link and image resolves, the README's
client example runs as written, and the version string is one (issue 33)."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "CHANGELOG.md",
        ROOT / "deploy" / "README.md",
        ROOT / "benchmarks" / "README.md",
        ROOT / "benchmarks" / "results" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); text may hold one level of brackets or inline code
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks; inline code spans keep their place (links may hold
    one as their text) but lose their content's brackets."""
    text = FENCE.sub("", text)
    return INLINE_CODE.sub(lambda m: "`" + re.sub(r"[\[\]()]", "_", m.group(0)[1:-1]) + "`", text)


def links(text: str) -> list[str]:
    return LINK.findall(_prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def test_the_link_pattern() -> None:
    text = (
        "see [a](docs/a.md#x), ![pic](b.png), [`code`](c.md) and [b](https://x.org/y), "
        "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n"
    )
    assert links(text) == ["docs/a.md#x", "b.png", "c.md", "https://x.org/y"]
    assert slug("Quality at capacity") == "quality-at-capacity"
    assert slug("`make serve`") == "make-serve"
    assert slug("What is built and run, and what is only linted") == (
        "what-is-built-and-run-and-what-is-only-linted"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link and image of the page points at a file of the repository (and at
    a heading of it, where the link names one)."""
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    broken = []
    for target in links(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no {dest}")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def _tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in out.split("\0") if name]


def test_nothing_points_outside_the_clone() -> None:
    """The repository stands alone: no tracked text file names a folder beside the clone."""
    needle = "../" + "shared"  # spelled so that this file does not match itself
    found = []
    for path in _tracked_files():
        if not path.is_file() or path.stat().st_size > 20_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        if needle.encode() in data:
            found.append(str(path.relative_to(ROOT)))
    assert not found, f"{needle} in {found}"


# -- the README's client example ---------------------------------------------------------------

CLIENT_BEGIN, CLIENT_END = "<!-- readme: client example -->", "<!-- /readme: client example -->"


def readme_client_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split(CLIENT_BEGIN, 1)[1].split(CLIENT_END, 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", block, re.S)
    return code


def test_readme_client_example_is_the_documented_one() -> None:
    code = readme_client_example()
    assert 'extra_body={"kv_budget": 2048}' in code
    assert 'base_url="http://127.0.0.1:8000/v1"' in code  # make serve's address
    assert 'model="smollm2"' in code  # the name make serve gives the embedded model
    compile(code, "README.md", "exec")


@pytest.mark.server
def test_readme_client_example_runs(caote_server) -> None:
    """The example, as written, against a real server (the test's own address and model)."""
    code = readme_client_example()
    code = code.replace("http://127.0.0.1:8000/v1", caote_server.base_url + "/v1")
    code = code.replace('model="smollm2"', f"model={caote_server.model!r}")
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    stats = scope["r"].model_extra["kv_eviction"]
    assert stats["budget"] == 2048 and stats["policy"] == "caote-snapkv", stats
    assert stats["evicted_tokens"] > 0, stats
    assert "evicted_tokens" in out.getvalue()


# -- one version string -------------------------------------------------------------------------


def test_one_version_string() -> None:
    """pyproject's version is the package's ``__version__``, the CHANGELOG's newest heading and
    the README's version line."""
    import vllm_caote

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert vllm_caote.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\S+)", changelog, re.M)
    assert newest and newest.group(1) == version, f"CHANGELOG's newest heading: {newest}"
    readme = re.search(r"^Version (\S+)", (ROOT / "README.md").read_text(), re.M)
    assert readme and readme.group(1) == version, f"README's version line: {readme}"
