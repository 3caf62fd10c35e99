"""Every `snakemake` command the docs tell a user to run passes a profile (README: "always pass one"): without
one, Snakemake's default rerun triggers rerun every rule whose script was edited or checked out anew."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Commands that run no job, so no rerun trigger applies.
NO_JOBS = {"-n", "--dry-run", "--dryrun", "--lint", "--report", "--rulegraph", "--dag", "--summary",
           "--detailed-summary", "--unlock", "--list-changes", "--touch", "--conda-create-envs-only", "--help",
           "--version", "--list-rules", "--cleanup-metadata"}
PROFILE = {"--profile", "--workflow-profile"}


def documented_commands(text: str) -> list[str]:
    """`snakemake ...` commands in a file: whole lines (in code blocks or after a `# Label:` comment, backslash
    continuations joined) and inline `code` spans."""
    text = text.replace("\\\n", " ")
    found = [m.group(1) for m in re.finditer(r"`(snakemake [^`]*)`", text)]
    for line in text.splitlines():
        line = re.sub(r"^\s*#\s*(\w[\w ]*:)?\s*", "", line)  # a Snakefile comment: '# Demo:      snakemake ...'
        line = re.sub(r"^([A-Z_]+=\S+\s+)+", "", line.strip())  # HF_HUB_OFFLINE=1 snakemake ...
        if line.startswith("snakemake ") and "`" not in line:
            found.append(line.split(" #")[0].split("(")[0])
    return found


def runs_jobs_without_a_profile(cmd: str) -> bool:
    words = set(shlex.split(cmd.split("|")[0]))
    return not words & NO_JOBS and not words & PROFILE


def test_the_parser_finds_commands_and_tells_runs_from_dry_runs():
    text = ("# Demo:      snakemake --workflow-profile profiles/local --cores 2\n"
            "```bash\nHF_HUB_OFFLINE=1 snakemake --profile p \\\n  results/x   # comment\n"
            "snakemake --cores 2 --configfile c.yaml\n```\nthen `snakemake -n t` and `snakemake t`.\n")
    cmds = documented_commands(text)
    assert len(cmds) == 5, cmds
    assert [c for c in cmds if runs_jobs_without_a_profile(c)] == ["snakemake t",
                                                                   "snakemake --cores 2 --configfile c.yaml"]


@pytest.mark.parametrize("doc", [
    "Snakefile",
    ".test/README.md",
    "README.md",
])
def test_every_documented_run_command_passes_a_profile(doc):
    cmds = documented_commands((REPO / doc).read_text())
    assert cmds, f"{doc}: no snakemake command found (has the parser gone stale?)"
    assert [c for c in cmds if runs_jobs_without_a_profile(c)] == [], doc
