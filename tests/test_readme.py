"""The README's set-up commands and CI stay in step."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_commands() -> list[str]:
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    commands = []
    for line in lines[1:]:
        if line.startswith("    "):
            commands.append(line.strip())
        elif commands:
            break
    return commands


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    commands = setup_commands()
    assert len(commands) == 2
    assert "bench.demo" in commands[0] and "pytest" in commands[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert commands[1] in ci.splitlines()
