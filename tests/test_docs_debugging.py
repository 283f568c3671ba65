"""docs/debugging.md is run like the README: every ```bash block, in order, in a scratch copy of
the repository, each compared with the ```text block marked `<!-- readme-test: output -->` after
it (the comparison rules are tests/test_readme.py's). The page plants a hang and a desync with
tools/desync.py and shows what a timeout, stack dumps, the flight recorder and
TORCH_DISTRIBUTED_DEBUG=DETAIL say; if torch changes what they print, this test says so."""

import pickle

import pytest
from helpers import PYTHON, ROOT, run
from test_readme import compare, parse, run_block, scratch_copy

PAGE = ROOT / "docs" / "debugging.md"


def test_every_command_shows_its_output():
    blocks = parse(PAGE.read_text())
    assert len(blocks) == 4 and all(b.outputs and not b.marker for b in blocks)


@pytest.mark.slow
def test_the_commands_run_verbatim_and_print_what_the_page_shows(tmp_path):
    work = scratch_copy(tmp_path)
    for block in parse(PAGE.read_text()):
        code, output = run_block(block.body, work)
        assert code == 0, f"docs/debugging.md:{block.line} failed with exit {code}:\n{output}"
        for want in block.outputs:
            missing = compare(want.body, output)
            assert missing is None, (
                f"docs/debugging.md:{block.line}: the page shows\n    {missing}\n"
                f"but the command printed:\n{output[-6000:]}"
            )
    # the blocks cleaned up after themselves
    assert not (work / "fr").exists() and not (work / "hang.log").exists()


def test_fr_last_names_the_rank_that_enqueued_fewer_collectives(tmp_path):
    # two ranks' dumps, as torch writes them: rank 1 never enqueued collective 3
    def entry(seq, dtype):
        return {"collective_seq_id": seq, "profiling_name": "gloo:all_reduce",
                "input_sizes": [[2]], "input_dtypes": [dtype]}  # fmt: skip

    for rank, enqueued in ((0, 3), (1, 2)):
        status = {"last_enqueued_collective": enqueued, "last_completed_collective": 2}
        entries = [entry(seq, "Float") for seq in range(1, enqueued + 1)]
        dump = {"pg_status": {"0": status}, "entries": entries}
        (tmp_path / f"rank_{rank}").write_bytes(pickle.dumps(dump))
    result = run([PYTHON, ROOT / "tools" / "fr_last.py", tmp_path, "--last", "1"], check=True)
    assert result.stdout.splitlines() == [
        "rank 0: enqueued 3, completed 2; last: #3 gloo:all_reduce [2] Float",
        "rank 1: enqueued 2, completed 2; last: #2 gloo:all_reduce [2] Float",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run([PYTHON, ROOT / "tools" / "fr_last.py", empty])
    assert result.returncode == 1
    assert (
        result.stderr
        == f"fr_last.py: error: no dump (a file whose name ends in its rank) in {empty}\n"
    )
