"""tools/gpu_check.py, the one-command GPU check, in its CPU mode (tiny presets): it must produce
its table from real torchrun runs, and a run that fails or hangs must become a row, not a crash."""

import os
import sys

import pytest
from helpers import PYTHON, load_script, run, script, worker_env

G = load_script("tools/gpu_check.py", "gpu_check_tool")


def test_cpu_mode_writes_one_table_from_real_runs(tmp_path):
    out_dir, work = tmp_path / "OUT", tmp_path / "work"
    result = run(
        [PYTHON, script("tools/gpu_check.py"), "--cpu", "--only", "micro-batch 4", "06 tiny",
         "--out", tmp_path / "table.md", "--work_dir", work],
        timeout=150,
        env=worker_env(OUT=out_dir),
        check=True,
    )  # fmt: skip
    table = (tmp_path / "table.md").read_text()
    assert (out_dir / "gpu_check.md").read_text() == table  # the device tool returns $OUT
    assert table in result.stdout
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(G.COLUMNS) and cells[0] != "run" and not cells[0].startswith("-"):
            rows[cells[0]] = dict(zip(G.COLUMNS, cells, strict=True))
    assert set(rows) == {"05 tiny, micro-batch 4", "06 tiny, batch 4"}  # --only chose two
    for row in rows.values():
        assert row["status"] == "ok"
        # peak memory, train.py's estimate and tokens/s were all read from the run
        assert float(row["peak allocated"].split()[0]) > 0
        assert float(row["estimate"].split()[0]) > 0
        assert float(row["tokens/s"].replace(",", "")) > 0
    # every run's log is kept, and no run got far enough to write a checkpoint
    assert len(list((out_dir / "gpu_check_logs").glob("*.log"))) == 2
    assert not list(work.rglob("ckpt.pt"))


def measure(tmp_path, code, timeout=60):
    check = G.Check("fake run", "05", [], steps=3, timeout=timeout)
    command = [sys.executable, "-c", code]
    return G.measure(check, command, tmp_path / "run", tmp_path / "log", {}, timeout, gpu=False)


def test_a_failed_run_is_a_row(tmp_path):
    row = measure(
        tmp_path, "import sys; sys.exit('train.py: error: --batch_size must be positive')"
    )
    assert row["status"] == "failed (exit 1): train.py: error: --batch_size must be positive"
    assert "peak allocated" not in row


def test_out_of_memory_is_named(tmp_path):
    code = (
        "import sys; print('Traceback (most recent call last):'); "
        "sys.exit('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.07 GiB')"
    )
    row = measure(tmp_path, code)
    assert row["status"].startswith("out of memory: torch.OutOfMemoryError: CUDA out of memory")


def test_a_hung_run_is_stopped_and_is_a_row(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    row = measure(tmp_path, code, timeout=2)
    assert row["status"] == "timed out after 2 s (0 of 3 steps)"
    with pytest.raises(ProcessLookupError):  # stopped, not left running
        os.kill(int(pid_file.read_text()), 0)
