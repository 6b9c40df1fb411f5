"""``cryoden --help`` and each command's ``--help`` read as plain text for a user."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cryoden.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
# Developer markup that must not reach a terminal (reST roles, literals, internal function names).
MARKUP = (":mod:", ":func:", ":class:", ":meth:", "``", "add_args")


def help_text(*args: str) -> str:
    """stdout of ``python -m cryoden ARGS`` run from this checkout (must exit 0)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    p = subprocess.run(
        [sys.executable, "-m", "cryoden", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def assert_plain(text: str) -> None:
    found = [m for m in MARKUP if m in text]
    assert not found, f"developer markup {found} in help:\n{text}"
    literal_blocks = [line for line in text.splitlines() if line.rstrip().endswith("::")]
    assert not literal_blocks, literal_blocks


def test_top_level_help_lists_commands_and_examples_without_markup():
    text = help_text("--help")
    assert_plain(text)
    for name, (_, summary) in COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(summary)}$", text, re.MULTILINE), name
        assert f"cryoden {name} " in text, f"no example of {name}"  # the examples section
    assert "cryoden COMMAND --help" in text and "docs/" in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_has_no_markup(command):
    text = help_text(command, "--help")
    assert text.startswith(f"usage: cryoden {command}")
    assert_plain(text)
