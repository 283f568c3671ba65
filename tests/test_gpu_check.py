"""tools/gpu_check.py, the one-command GPU check, in its CPU mode (tiny presets): it must produce
its table from real torchrun runs, and a run that fails or hangs must become a row, not a crash."""

import os
import subprocess
import sys
import time

import pytest
from helpers import PYTHON, load_script, run, script, worker_env

G = load_script("tools/gpu_check.py", "gpu_check_tool")


@pytest.mark.slow
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
    return G.measure(check, command, tmp_path / "run", tmp_path / "log", {}, timeout, uuid=None)


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


# a run that ignores SIGTERM and never writes a step: only SIGKILL ends it
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


@pytest.mark.slow
def test_the_budget_is_a_hard_limit(tmp_path, monkeypatch, capsys):
    """With stubborn runs, every wait (each run, stopping it) must still end by --budget."""
    monkeypatch.setattr(G, "make_data", lambda work, gpu, env, deadline: (work, work))
    monkeypatch.setattr(
        G, "train_command", lambda check, work, data, gpu: ([PYTHON, "-c", STUBBORN], work / "r")
    )
    monkeypatch.setattr(
        G, "cpu_checks", lambda: [G.Check(f"stuck {i}", "05", []) for i in range(3)]
    )
    # the tool's waits, shortened: 1 s to stop a run, 3 s kept in reserve, runs of 4 s at least
    monkeypatch.setattr(G, "STOP_GRACE", 1)
    monkeypatch.setattr(G, "RESERVE", 3)
    monkeypatch.setattr(G, "MIN_RUN", 4)
    budget = 9
    start = time.monotonic()
    G.main(["--cpu", "--budget", str(budget), "--work_dir", str(tmp_path)])
    took = time.monotonic() - start
    out = capsys.readouterr().out
    assert took <= budget + 2, f"{took:.0f} s for a budget of {budget} s"
    assert "| stuck 0 |" in out and "timed out after" in out
    assert "skipped: out of time (--budget)" in out  # the last run had no time left
    assert G.NOT_MEASURED in out  # the table says what one rank cannot show


def test_nvidia_smi_is_asked_about_the_gpu_the_runs_use(monkeypatch):
    """By the UUID of CUDA's device 0 (the first of CUDA_VISIBLE_DEVICES), never by index 0."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="2048\n")

    monkeypatch.setattr(G.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(G.subprocess, "run", fake_run)
    assert G.gpu_memory_used_gb("GPU-0b42632a-bc5c-f731-724b-6936a19c4b24") == 2048 * 2**20 / 1e9
    assert calls[-1][-2:] == ["-i", "GPU-0b42632a-bc5c-f731-724b-6936a19c4b24"]
    assert G.gpu_memory_used_gb(None) is None  # no UUID: no reading rather than another GPU's
    assert len(calls) == 1
