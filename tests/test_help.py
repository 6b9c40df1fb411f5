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


@pytest.mark.parametrize("job", ["denoise", "train", "tomo-denoise", "tomo-train"])
def test_relion_job_help_describes_that_job(job):
    """`cryoden relion JOB --help` says what JOB does (not the list of all jobs), and every
    option it lists has a help text."""
    from cryoden import relion

    parser = relion.job_parser(job)
    text = parser.format_help()
    assert_plain(text)
    description = text.split("\n\n")[1]
    assert description.startswith(f"RELION External job '{job}'"), description
    others = [j for j in relion.JOBS if j != job and f"'{j}'" in description]
    assert not others, description
    expected = {
        "denoise": "denoised_micrographs.star",
        "train": "rlnMicrographNameEven",
        "tomo-denoise": "rlnTomoReconstructedTomogramDenoised",
        "tomo-train": "Half1/Half2",
    }[job]
    assert expected in " ".join(description.split())
    bare = [a.option_strings for a in parser._actions if not a.help]
    assert not bare, f"options without help: {bare}"
