"""docs/deployment.md against scripts/deploy/: verbatim copies, commands that match each script's usage line."""

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from sift_fl.cli import build_parser

PROJECT = Path(__file__).resolve().parents[1]
DOC = (PROJECT / "docs" / "deployment.md").read_text(encoding="utf-8")
SCRIPTS = sorted((PROJECT / "scripts" / "deploy").glob("*.sh"))
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def doc_commands() -> list[list[str]]:
    """Return each command of the walk-through's bash blocks (not the script copies) as argv, without leading VAR=value."""
    walkthrough = DOC[: DOC.index("## The scripts")]
    commands = []
    for block in bash_blocks(walkthrough):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line)
            while argv and ASSIGNMENT.match(argv[0]):
                argv = argv[1:]
            if argv and argv[0] != "export":
                commands.append(argv)
    return commands


def usage_arity(script: Path) -> tuple[int, int | None]:
    """Return the (min, max) argument count of a script's `# Usage:` line; max is None for a repeatable last argument."""
    usage = next(line for line in script.read_text().splitlines() if line.startswith("# Usage:"))
    arguments = usage.split()[3:]
    required = [a for a in arguments if not a.startswith("[")]
    if arguments and arguments[-1].endswith("..."):
        return len(required), None
    return len(required), len(arguments)


def run_config_keys(value: str) -> set[str]:
    return {token.split("=", 1)[0] for token in shlex.split(value)}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_doc_copies_script_verbatim(script):
    assert f"```bash\n{script.read_text()}```" in DOC


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_executable(script):
    assert script.stat().st_mode & 0o111


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_without_arguments_prints_usage(script):
    completed = subprocess.run([str(script)], capture_output=True, text=True, timeout=30)

    assert completed.returncode == 2
    assert completed.stderr.startswith("usage:")


def test_doc_commands_exist():
    names = {argv[0] for argv in doc_commands()}

    assert names <= {f"scripts/deploy/{p.name}" for p in SCRIPTS} | {"sift-fl"}


def test_doc_uses_every_script():
    used = {argv[0] for argv in doc_commands()}

    assert {f"scripts/deploy/{p.name}" for p in SCRIPTS} <= used


def test_doc_commands_match_usage():
    for argv in doc_commands():
        if not argv[0].startswith("scripts/"):
            continue
        low, high = usage_arity(PROJECT / argv[0])
        count = len(argv) - 1

        assert count >= low, argv
        assert high is None or count <= high, argv


def test_doc_sift_fl_commands_parse():
    for argv in doc_commands():
        if argv[0] == "sift-fl":
            build_parser().parse_args(argv[1:])


def test_doc_run_config_keys_declared():
    declared = set(tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    runs = [argv for argv in doc_commands() if argv[0].endswith("/run.sh")]

    assert runs != []
    for argv in runs:
        assert run_config_keys(argv[2]) <= declared, argv[2]


def test_test_runs_scripts_of_doc():
    # The deployment test drives these scripts; a script renamed here must be renamed there too.
    test_source = (PROJECT / "tests" / "test_deployment.py").read_text()

    assert {p.name for p in SCRIPTS} <= set(re.findall(r'"([a-z-]+\.sh)"', test_source))
