"""README.md: its Python blocks run as written, and it cites no file a user does not have.

Every ```python block runs, in order, in one namespace (as a reader would type them into one
session), with no Ollama, no calibration file and DNS pointed at a closed loopback port, so
nothing leaves the machine. A block that needs something a test cannot provide is marked just
before it with ``<!-- readme-test: skip (REASON) -->``; exactly those are skipped, with their
reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(?:<!-- readme-test: skip \((?P<skip>[^)]*)\) -->\n)?^```python\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    skip: str | None


def blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [Block(text.count("\n", 0, match.start("code")) + 1, match.group("code"),
                  match.group("skip")) for match in _BLOCK.finditer(text)]


def test_the_readme_has_python_blocks_and_marks_only_some():
    found = blocks()
    assert len(found) >= 3
    assert [b.skip for b in found if b.skip] == [
        "needs SynapticLlamas: its sollol_load_balancer module and a live registry"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No calibration file, no user settings, DNS to a port where nothing listens."""
    monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", "")
    monkeypatch.setenv("SOLLOL_LOCALITY_NAMESERVERS", "127.0.0.1:9")
    monkeypatch.setenv("SOLLOL_LOCALITY_DNS_TIMEOUT", "0.3")
    for name in ("SOLLOL_LOCALITY_MODE", "SOLLOL_LOCALITY_TOPOLOGY",
                 "SOLLOL_LOCALITY_MIN_SPEEDUP"):
        monkeypatch.delenv(name, raising=False)


def test_every_python_block_runs_as_written(offline, capsys):
    namespace: dict[str, object] = {"__name__": "readme"}
    ran = skipped = 0
    for block in blocks():
        if block.skip:
            skipped += 1
            continue
        exec(compile(block.code, f"README.md, block at line {block.line}", "exec"), namespace)
        ran += 1
    assert ran >= 3 and skipped == 1
    out = capsys.readouterr().out
    # The first block prints the plan for two local instances and one remote machine.
    assert "parallel 1.43x ['http://localhost:11434', {'url': 'http://10.0.0.5:11434'}]" in out


def test_the_readme_cites_no_file_users_lack():
    text = README.read_text(encoding="utf-8")
    for name in ("DESIGN.md", "STYLE.md", "PROPOSAL.md", "proposal"):
        assert name not in text
    for link in re.findall(r"\]\(([^)#:]+)\)", text):  # relative links point at shipped files
        assert (README.parent / link).exists(), link


def test_the_readme_documents_the_exit_codes():
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert ("Exit status: **0** an answer was printed" in text
            and "**2** a usage or configuration error" in text
            and "**3** none of the nodes given is usable" in text)


def test_the_python_blocks_run_in_a_fresh_interpreter(tmp_path):
    """As a reader runs them: one new ``python`` process, the blocks in order, no state of
    the test process (no user settings, a private HOME)."""
    import os
    import subprocess
    import sys

    code = "\n".join(block.code for block in blocks() if not block.skip)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SOLLOL_LOCALITY_", "XDG_"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(README.parent),
               SOLLOL_LOCALITY_NAMESERVERS="127.0.0.1:9", SOLLOL_LOCALITY_DNS_TIMEOUT="0.3")
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        "parallel 1.43x ['http://localhost:11434', {'url': 'http://10.0.0.5:11434'}]")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a calibration file
