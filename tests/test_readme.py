"""The README is what readers type: its set-up commands are the ones CI runs, and every script it
names exists."""

import re

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def setup_commands():
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_setup_is_two_commands_and_ci_runs_the_test_command_verbatim():
    install, tests = setup_commands()
    assert "pip install torch==2.13.0" in install and "01_single_gpu.py" in install
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines  # the README's test command, word for word


def test_every_script_the_readme_names_exists():
    named = set(re.findall(r"[\w./-]+\.(?:py|sh)\b", README))
    folders = [ROOT, *(ROOT / d for d in ("slurm", "tests", "05_gpt_ddp", "06_llama_ddp"))]
    missing = sorted(n for n in named if not any((d / n).exists() for d in folders))
    assert len(named) > 20 and not missing, missing
