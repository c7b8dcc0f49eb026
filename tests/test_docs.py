"""Every code block of README.md and docs/*.md runs, and prints what the page shows.

A ```python block runs in a fresh process, as a file `example.py` (what its tracebacks and
xla_loop's messages name), in the repository, with PJRT_DEVICE=CPU; a
```bash block runs in bash, with `.venv/bin` first on PATH. When the block right after it is
```text, that is what the code prints (stdout), compared line by line: a line with "..."
matches any text there, and a line that is only "..." any number of lines. A comment
`<!-- env: NAME=value ... -->` right before a block adds to its environment. A ```text block
that follows no code block is not code (a diagram), and every other fenced block is refused.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_ENV = re.compile(r"<!-- env: (.*?) -->\s*$")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    env: dict[str, str]
    output: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        fences = list(_FENCE.finditer(text))
        for k, fence in enumerate(fences):
            language = fence.group(1)
            if language == "text":
                continue
            before = text[: fence.start()].rstrip("\n").splitlines()
            env = dict(item.split("=", 1) for item in _ENV.match(before[-1]).group(1).split()) if before and _ENV.match(before[-1]) else {}
            after = fences[k + 1] if k + 1 < len(fences) else None
            follows = after is not None and after.group(1) == "text" and text[fence.end() : after.start()].strip() == ""
            found.append(Block(page, text[: fence.start()].count("\n") + 1, language, fence.group(2), env, after.group(2) if follows else None))
    return found


def _matches(expected: str, actual: str) -> bool:
    pattern = []
    for line in expected.strip("\n").splitlines():
        if line.strip() == "...":
            pattern.append(r"(?:.*\n)*?")
            continue
        parts = [re.escape(part) for part in line.rstrip().split("...")]
        pattern.append(".*?".join(parts) + r"[ \t]*\n")
    return re.fullmatch("".join(pattern), actual.strip("\n") + "\n") is not None


ALL = blocks()


def test_every_fenced_block_is_code_or_its_output():
    assert ALL, "no code block found"
    assert {b.language for b in ALL} <= {"python", "bash"}, [b.id for b in ALL if b.language not in ("python", "bash")]


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_code_block_runs_and_prints_what_the_page_shows(block, tmp_path):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONWARNINGS": "ignore", **block.env}
    env.pop("TORCH_LOGS", None) if "TORCH_LOGS" not in block.env else None
    if block.language == "python":
        (tmp_path / "example.py").write_text(block.code)
        command = [sys.executable, str(tmp_path / "example.py")]
    else:
        env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"
        command = ["bash", "-c", "set -e\n" + block.code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if block.output is not None:
        assert _matches(block.output, done.stdout), f"{block.id} printed:\n{done.stdout}\nthe page shows:\n{block.output}"


def test_the_output_matcher():
    assert _matches("a 1\n...\nz", "a 1\nb\nc\nz\n")
    assert _matches("took ... ms", "took 12 ms\n")
    assert not _matches("a 1", "a 2\n")
    assert not _matches("a", "a\nb\n")
