"""The README runs as pasted: every ```bash block and every ```python snippet is run,
in order, in a shell that has loaded `. .data/dev.env`, against a fresh `credits dev`
on the embedded stack, from a new directory (as a new user's clone).

A block may be left out only with a marker on the line above it that says why:
`<!-- readme-test: skip (needs Docker and a Stripe account) -->`. Inside the blocks,
`curl` fails on an HTTP error status (`--fail-with-body`), unless the block asks for
the status itself (`-w`); `bash -euo pipefail` makes any failing command fail the block.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from tests.e2e.test_cli import Stack, _bare_env, _free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN_LANGUAGES = ("bash", "python")
SKIP = re.compile(r"^\s*<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
BLOCK_TIMEOUT_S = 180
PRELUDE = """set -euo pipefail
curl() {
  case " $* " in
    *" -w "*) command curl "$@" ;;
    *) command curl --fail-with-body "$@" ;;
  esac
}
. .data/dev.env
"""


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: str | None  # the reason given, if the block is not run


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None or not match.group("lang"):
            i += 1
            continue
        indent, lang, start = match.group("indent"), match.group("lang"), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(previous)
        code = textwrap.dedent("\n".join(body)) if indent else "\n".join(body)
        found.append(Block(lang, code + "\n", start + 1, skip.group("reason") if skip else None))
        i += 1
    return found


def test_every_block_runs_or_says_why_not() -> None:
    found = [b for b in blocks(README.read_text()) if b.lang in RUN_LANGUAGES]
    run = [b for b in found if b.skip is None]
    assert len(run) >= 9, "the README's examples are run by this test"
    assert any(b.lang == "python" for b in run)
    for b in found:
        if b.skip is not None:
            assert len(b.skip) > 10, f"README line {b.line}: say why the block is not run"
    # A marker that names no block would hide nothing; one per skipped block.
    markers = sum(1 for line in README.read_text().splitlines() if SKIP.match(line))
    assert markers == len(found) - len(run)


def test_the_readme_runs_as_pasted(tmp_path: pathlib.Path) -> None:
    if shutil.which("jq") is None:
        if os.environ.get("CI"):
            pytest.fail("jq is not installed: .ci/run installs it, and CI must run this test")
        pytest.skip("jq is not installed (the README's examples use it; .ci/run installs it)")
    project = tmp_path / "clone"
    project.mkdir()
    (project / "examples").symlink_to(ROOT / "examples")
    env = _bare_env(tmp_path)
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"METER_PORT": str(_free_port()), "BILLING_PORT": str(_free_port()), "SETTLER_PORT": str(_free_port())})
    stack = Stack(project, env)
    try:
        for n, block in enumerate(blocks(README.read_text())):
            if block.lang not in RUN_LANGUAGES or block.skip is not None:
                continue
            if block.lang == "python":
                script = project / f"readme_block_{n}.py"
                script.write_text(block.code)
                command = PRELUDE + f"python {script.name}\n"
            else:
                command = PRELUDE + block.code
            proc = subprocess.run(
                ["bash", "-c", command],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
            assert proc.returncode == 0, (
                f"README.md line {block.line} ({block.lang}) failed with {proc.returncode}:\n"
                f"--- block ---\n{block.code}--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n"
                f"{proc.stderr[-4000:]}"
            )
    finally:
        assert stack.stop() == 0
