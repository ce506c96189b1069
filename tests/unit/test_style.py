"""The tree is formatted and linted as pyproject.toml's [tool.ruff] says, by the ruff the test extra
pins: a change that is not fails here, in the README's test command and in CI alike."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [["check", "--no-fix"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_content_with_the_tree(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} .:\n{result.stdout}{result.stderr}"
