"""The README's and docs' command blocks marked runnable run and print what they say; every relative
link points to a file (and heading) that exists. The convention is in docs/README.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*?\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    info: str
    text: str


def blocks_and_prose(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """Fenced blocks (a fence closes only on the same character, at least as long) and the lines
    outside them."""
    blocks, prose = [], []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, info, start, body = m.group(1), m.group(2).strip(), i, []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if (close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence)
                    and not close.group(2).strip()):
                break
            body.append(lines[i])
            i += 1
        blocks.append(Block(page, start + 1, info, "\n".join(body) + "\n"))
        i += 1
    return blocks, prose


@dataclass
class Runnable:
    block: Block
    expected: str | None  # what it prints on stdout, when the page says

    @property
    def id(self) -> str:
        return f"{self.block.page.relative_to(REPO)}:{self.block.line}"


def runnables(page: Path) -> list[Runnable]:
    blocks, prose = blocks_and_prose(page)
    lines = page.read_text().splitlines()
    found = []
    for k, b in enumerate(blocks):
        if b.info.split() != ["bash", "runnable"]:
            continue
        expected = None
        if k + 1 < len(blocks) and blocks[k + 1].info.split() == ["text", "output"]:
            end = b.line + b.text.count("\n")  # the closing fence's 0-based index
            between = lines[end + 1: blocks[k + 1].line - 1]
            if all(not line.strip() for line in between):
                expected = blocks[k + 1].text
        found.append(Runnable(b, expected))
    return found


def matches(expected: str, actual: str) -> bool:
    """Line for line, trailing spaces ignored; ``...`` in an expected line stands for any text."""
    want = [line.rstrip() for line in expected.rstrip("\n").splitlines()]
    got = [line.rstrip() for line in actual.rstrip("\n").splitlines()]
    if len(want) != len(got):
        return False
    for w, g in zip(want, got):
        pattern = ".*".join(re.escape(part) for part in w.split("..."))
        if not re.fullmatch(pattern, g):
            return False
    return True


ALL = [r for page in PAGES for r in runnables(page)]


@pytest.mark.parametrize("runnable", ALL, ids=[r.id for r in ALL])
def test_runnable_block(runnable: Runnable, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL",
                                                            "TILEWISE_STORE_ROOT")}
    env.update(TILEWISE_HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), NO_COLOR="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", runnable.block.text], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{runnable.id} exited {result.returncode}:\n{runnable.block.text}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr[-3000:]}")
    if runnable.expected is not None:
        assert matches(runnable.expected, result.stdout), (
            f"{runnable.id} printed\n{result.stdout}\nwhere the page says\n{runnable.expected}")


def test_the_quick_commands_are_shown_runnable():
    """The commands a new user tries first are shown, and so tested, as runnable blocks."""
    commands = " ".join(r.block.text for r in ALL)
    for command in ("tilewise --version", "tilewise catalog validate", "tilewise catalog list", "tilewise ingest ",
                    "tilewise infer --help"):
        assert command in commands, f"no runnable block runs {command!r}"
    readme = [r for r in ALL if r.block.page.name == "README.md" and r.block.page.parent == REPO]
    assert readme and all(r.expected is not None for r in readme), "the README's runnable blocks say what they print"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = blocks_and_prose(page)
    return {slug(line.lstrip("#")) for _, line in prose if re.match(r"^#{1,6} ", line)}


def links(page: Path) -> list[tuple[int, str]]:
    _, prose = blocks_and_prose(page)
    found = []
    for number, line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_point_to_files_that_exist(page: Path):
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}:{number}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{page.name}:{number}: {target} (no heading #{anchor} in {file.name})")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_reference_page():
    readme = {target.partition("#")[0] for _, target in links(REPO / "README.md")}
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages - readme == set(), f"pages of docs/ the README does not link: {sorted(pages - readme)}"


# ------------------------------------------------------------------ the checker itself, on made-up pages

def test_the_checker_reads_blocks_outputs_and_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Intro [ok](page.md) and `[not](a-link.md)`.\n\n"
                    "````markdown\n```bash runnable\nfalse\n```\n````\n\n"
                    "```bash runnable\necho one\n```\n\n```text output\none\n```\n\n"
                    "```bash runnable\necho two\n```\ntext between\n```text output\nnot its output\n```\n\n"
                    "## A heading: `with` code\n[gone](missing.md) [anchor](#a-heading-with-code)\n")
    found = runnables(page)
    assert [(r.block.text, r.expected) for r in found] == [("echo one\n", "one\n"), ("echo two\n", None)]
    assert [t for _, t in links(page)] == ["page.md", "missing.md", "#a-heading-with-code"]
    assert "a-heading-with-code" in anchors(page)


def test_the_output_comparison():
    assert matches("ingested: .../s.zarr (em, ... s)\n", "ingested: /tmp/x/s.zarr (em, 1.2 s)\n")
    assert matches("a  \nb\n", "a\nb")
    assert not matches("ingested: .../s.zarr\n", "unchanged: /tmp/s.zarr\n")
    assert not matches("a\n", "a\nb\n")
