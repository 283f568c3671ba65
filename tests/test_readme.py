"""The README is what readers type, so CI types it too.

`test_readme_commands_run_verbatim_and_print_what_it_shows` copies the repository to a scratch
folder and runs every ```bash block of README.md in order, as a reader would, in one shell
session per block with the README's venv active. A ```text block marked `<!-- readme-test:
output -->` is what the last command printed, and is compared with what it really printed:

- its lines must appear in the real output in the same order (other lines may come between:
  warnings, lines the README leaves out; `...` in the README stands for those);
- the words must be equal and the numbers must agree, exactly where the README prints an integer
  and to within TOLERANCE units of the last printed digit for a decimal. Why a tolerance: float
  sums can round differently with other vector instructions (AVX2 against AVX-512); step 01 is
  identical to 4 decimals under ATEN_CPU_CAPABILITY=default/avx2/avx512 and
  MKL_ENABLE_INSTRUCTIONS=SSE4_2, and longer trainings drift by at most a few units in the 4th;
- numbers that measure the machine, not the training (times, tokens/s, MFU, memory, ports) are
  not compared: VOLATILE lists them; and `<word>` in the README (e.g. `<hostname>`) matches any
  word.

Markers, an HTML comment on the line before a block (invisible on GitHub):
- `<!-- readme-test: skip REASON -->`: not run here (a GPU, a real cluster, the two set-up
  commands, which `.ci/run` runs verbatim on a fresh clone); every skipped block is listed in the
  test summary with its reason.
"""

import difflib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import ROOT

README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
TOLERANCE = 3  # units of the last printed digit, for decimals; integers must be equal
BLOCK_TIMEOUT = 300  # seconds for any one block
# a number followed by one of these is a measurement of the machine: not compared
VOLATILE = re.compile(
    r"^\s*(ms|s\b|tok/s|GB|MB|KB|TFLOP/s|GFLOP/s|%|x faster|× faster|steps?/s|it/s)"
)
VOLATILE_AFTER = re.compile(r"(MFU|mem|port|pid|PID)\s*$")
STEPS_05_06 = ("05_gpt_ddp", "06_llama_ddp")
SKIPPED = []  # (block, reason), reported in the test summary by conftest.py
TIMES = []  # (block, seconds), reported there too


@dataclass
class Block:
    line: int  # 1-based line of the opening fence in README.md
    lang: str
    body: str
    marker: str = ""
    chapter: str = ""  # the `## ` heading the block stands under
    outputs: list = field(default_factory=list)  # expected ```text blocks after a command

    def title(self):
        first = self.body.strip().splitlines()[0]
        return f"README.md:{self.line}: {first[:70]}"


def parse(text):
    """The README's fenced blocks, in order, with the marker comment before each."""
    fence = re.compile(
        r"^(?:(?P<indent_m> *)<!-- readme-test: (?P<marker>.*?) -->\n)?"
        r"(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)\n(?P=indent)```$",
        re.M | re.S,
    )
    blocks = []
    for m in fence.finditer(text):
        body = "\n".join(line[len(m["indent"]) :] for line in m["body"].splitlines())
        line = text.count("\n", 0, m.start("indent")) + 1
        headings = re.findall(r"^## (.+)$", text[: m.start()], re.M)
        chapter = headings[-1] if headings else ""
        blocks.append(Block(line, m["lang"], body, (m["marker"] or "").strip(), chapter))
    commands = []
    for b in blocks:
        if b.lang == "bash":
            commands.append(b)
        elif b.marker == "output":
            assert commands, f"README.md:{b.line}: an output block before any command"
            commands[-1].outputs.append(b)
    return commands


NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?"


def line_pattern(expected):
    """The expected line as a regex: words literal, any run of spaces as \\s+, every number a
    group, a `<placeholder>` any word, `...` inside a line any text. Returns the regex and, per
    group, the number to compare with (None where the number is volatile)."""
    parts, wanted = [], []
    pieces = rf"(?P<dots>\.\.\.|…)|(?P<any><[\w -]+>)|(?P<num>{NUMBER})|(?P<space>\s+)|(?P<c>.)"
    for m in re.finditer(pieces, expected):
        if m["dots"]:
            parts.append(".*?")
        elif m["any"]:
            parts.append(r"\S+")
        elif m["num"]:
            parts.append(f"({NUMBER})")
            wanted.append(None if _volatile(expected, m) else m["num"])
        elif m["space"]:
            parts.append(r"\s+")
        else:
            parts.append(re.escape(m["c"]))
    # the spaces around a `...` are optional: "peer ... Check" matches "peer. This ... Check"
    regex = "".join(parts).replace(r"\s+.*?", r"\s*.*?").replace(r".*?\s+", r".*?\s*")
    return re.compile(regex), wanted


def _volatile(line, m):
    return bool(VOLATILE.match(line[m.end() :]) or VOLATILE_AFTER.search(line[: m.start()]))


def _number(t):
    return float(t.replace(",", ""))


def numbers_agree(expected, actual):
    if re.fullmatch(r"[-+]?[\d,]+", expected):
        return expected == actual
    decimals = len(expected.split(".")[1].split("e")[0]) if "." in expected else 0
    scale = 10**-decimals * (10 ** int(expected.split("e")[1]) if "e" in expected else 1)
    return abs(_number(expected) - _number(actual)) <= TOLERANCE * scale * (1 + 1e-9)


def line_matches(expected, actual):
    """Same words in the same order; numbers within tolerance; placeholders match one word."""
    pattern, wanted = line_pattern(expected.strip())
    m = pattern.fullmatch(actual.strip())
    if not m:
        return False
    return all(w is None or numbers_agree(w, a) for w, a in zip(wanted, m.groups(), strict=True))


def compare(expected_text, output):
    """Every expected line, in order, somewhere in the output; returns what is missing."""
    lines = output.splitlines()
    pos = 0
    for want in expected_text.splitlines():
        if not want.strip() or want.strip() in ("...", "…"):
            continue
        while pos < len(lines) and not line_matches(want, lines[pos]):
            pos += 1
        if pos == len(lines):
            return want
        pos += 1
    return None


def scratch_copy(tmp_path):
    """The repository as a fresh clone has it (tracked files and new files, nothing ignored), with
    the venv these tests run in as its `.venv`: the README's set-up command made it in CI."""
    work = tmp_path / "ddp-tutorial"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for rel in filter(None, listed):
        src = ROOT / rel.decode()
        if src.is_file():
            dst = work / rel.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return work


def run_block(command, work):
    """Run one block as a reader does: bash in a terminal, in the repository, venv active.

    A real terminal (a pseudo-terminal made by util-linux's `script`), because that is what the
    README describes: the output of several processes appears in the order it was printed. Lines
    that several ranks print at once must each be one write (torchrun's workers run `python -u`,
    whose print() writes the newline separately), or they can mix as they would for a reader.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "PYTEST"))}
    venv = work / ".venv" / "bin"
    # as after `source .venv/bin/activate`
    env.update(PATH=f"{venv}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv.parent))
    for name in ("PYTHONPATH", "PYTHONUNBUFFERED"):
        env.pop(name, None)
    block = work.parent / "block.sh"
    block.write_text(command + "\n")
    proc = subprocess.run(
        ["script", "--quiet", "--return", "--command", f"bash -e -o pipefail {block}", "/dev/null"],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    return proc.returncode, proc.stdout.replace("\r\n", "\n")


def test_readme_markers_are_well_formed():
    """A typo in a marker must not quietly turn a checked block into an unchecked one."""
    commands = parse(README)
    assert len(commands) >= 15
    markers = re.findall(r"<!-- readme-test: (.*?) -->", README)
    assert all(re.match(r"(skip \S|output$)", m) for m in markers)
    checked = [b for b in commands if b.outputs and not b.marker]
    assert len(checked) >= 10, "most commands must show what they print"


@pytest.mark.slow
def test_readme_commands_run_verbatim_and_print_what_it_shows(tmp_path):
    work = scratch_copy(tmp_path)
    # while writing a chapter: README_CHAPTERS="Step 05,Step 08" runs only the chapters whose
    # headings start so (each chapter cleans up after itself, so chapters run alone)
    only = [c.strip() for c in os.environ.get("README_CHAPTERS", "").split(",") if c.strip()]
    for block in parse(README):
        if only and not block.chapter.startswith(tuple(only)):
            continue
        if block.marker.startswith("skip"):
            SKIPPED.append((block.title(), block.marker[5:]))
            continue
        command, expected = block.body, [o.body for o in block.outputs]
        start = time.monotonic()
        code, output = run_block(command, work)
        TIMES.append((block.title(), time.monotonic() - start))
        assert code == 0, f"{block.title()} failed with exit {code}:\n{output[-4000:]}"
        for want in expected:
            missing = compare(want, output)
            assert missing is None, (
                f"{block.title()}: the README shows\n    {missing}\nbut the command printed:\n"
                f"{output[-6000:]}"
            )


def test_setup_is_two_commands_and_ci_runs_both_verbatim():
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    install, tests = re.findall(r"```bash\n(.+?)\n```", setup)
    assert "pip install torch==2.13.0" in install and "01_single_gpu.py" in install
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    # both word for word: CI creates its venv with the first and runs the tests with the second
    assert install in ci_lines and tests in ci_lines
    assert ci_lines.index(install) < ci_lines.index(tests)
    # and CI runs it with skips turned into failures, set before that line
    no_skip = ci_lines.index("export DDP_TUTORIAL_NO_SKIP=1")
    assert no_skip < ci_lines.index(tests)


def test_every_script_the_readme_names_exists():
    named = set(re.findall(r"[\w./-]+\.(?:py|sh)\b", README))
    folders = [ROOT, *(ROOT / d for d in ("slurm", "tests", "05_gpt_ddp", "06_llama_ddp"))]
    folders.append(ROOT / "07_ddp_from_scratch")
    folders.append(ROOT / "08_fsdp")
    missing = sorted(n for n in named if not any((d / n).exists() for d in folders))
    assert len(named) > 20 and not missing, missing


def test_every_link_and_picture_in_the_readme_exists():
    targets = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", README)
    missing = sorted(t for t in targets if not (ROOT / t.split("#")[0]).exists())
    assert targets and not missing, missing


def test_readme_is_short_and_has_a_table_of_contents():
    assert len(README.splitlines()) <= 750
    anchors = re.findall(r"\]\(#([\w-]+)\)", README)
    headings = {_anchor(h) for h in re.findall(r"^## (.+)$", README, re.M)}
    assert len(anchors) >= 8 and set(anchors) <= headings, set(anchors) - headings


def _anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_comparison_catches_a_wrong_number_and_allows_rounding():
    """The checker itself: a wrong loss or count fails; a last-digit rounding, a time, a
    throughput and a placeholder do not."""
    out = "[cpu] epoch 0 | 64 batches of 32 | train loss 8.1988 | val loss 3.2505\nmore"
    line = "[cpu] epoch 0 | 64 batches of 32 | train loss {} | val loss 3.2505"
    assert compare(line.format("8.1987"), out) is None  # 1 unit in the last digit
    assert compare("...\n" + line.format("8.1986"), out) is None
    assert compare(line.format("8.2087"), out)  # 101 units: a different number
    assert compare(line.format("8.1987").replace("of 32", "of 33"), out)  # integers are exact
    assert compare(line.format("8.1987").replace("val", "test"), out)  # words are exact
    timed = "step 10 | loss 4.0091 | 1839 ms (data 0%) | 2,228 tok/s | MFU 39.9% | mem 0.81 GB"
    assert compare(timed, timed.replace("1839", "912").replace("2,228", "4,001")) is None
    assert compare(timed, timed.replace("39.9", "12.0").replace("0.81", "1.23")) is None
    assert compare(timed, timed.replace("4.0091", "4.1091"))
    host = "rank 0 of 2 (local rank 0) on <hostname>"
    assert compare(host, "rank 0 of 2 (local rank 0) on node7.cluster") is None
    assert compare(host, "rank 1 of 2 (local rank 0) on node7")
    assert compare("a\nb", "b\na")  # order matters
    assert (
        compare(
            "E1126 ... failed (exitcode: -9) local_rank: <n>",
            "E1126 03:21:10 x failed (exitcode: -9) local_rank: 1",
        )
        is None
    )
    assert compare("... failed (exitcode: -9)", "E1 x failed (exitcode: -15)")


def test_step_06_lesson_lines_are_what_its_diff_with_step_05_adds():
    """The chapter says the diff of 05's and 06's train.py is its lesson: each line it shows as the
    lesson is one the diff adds, unless the line says it is there "as in step 05"."""
    chapter = README.split("## Step 06", 1)[1].split("\n## ", 1)[0]
    lesson = re.search(r"```python\n(.+?)\n```", chapter, re.S)[1].splitlines()
    old, new = ((ROOT / f / "train.py").read_text().splitlines() for f in STEPS_05_06)
    added = [line for line in difflib.ndiff(old, new) if line.startswith("+ ")]
    for line in lesson:
        code, _, comment = line.partition("  #")
        key = code.split("(")[0].strip()  # the call or assignment, as the script spells it
        in_diff = any(key in a for a in added)
        if "as in step 05" in comment:
            assert not in_diff and all(key in "\n".join(t) for t in (old, new)), line
        else:
            assert in_diff, f"README's step 06 shows {line!r}, which the diff does not add"
