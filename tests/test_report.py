"""report.py (the same file in 05_gpt_ddp/ and 06_llama_ddp/): the MFU peak of a GPU, the bf16 hint
on CPUs, and the fits / does-not-fit verdict of the memory estimate. No GPU is needed: the CUDA
queries are replaced by what real cards return."""

import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, load_script


def import_report():
    """05's report.py with 05's model.py as its `model` (report.py does `from model import`)."""
    saved = sys.modules.get("model")
    try:
        sys.modules["model"] = model = load_script("05_gpt_ddp/model.py", "gpt05_model_report")
        report = load_script("05_gpt_ddp/report.py", "gpt05_report_report")
    finally:
        if saved is None:
            del sys.modules["model"]
        else:
            sys.modules["model"] = saved
    return model, report


M, R = import_report()
CUDA = torch.device("cuda", 0)  # only a name here: nothing touches a GPU
CPU = torch.device("cpu")


def make_args(tmp_path, **overrides):
    args = dict(
        peak_flops=None,
        dtype="fp32",
        batch_size=4,
        activation_checkpointing=False,
        out_dir=tmp_path,
        preset="tiny",
        log_every=1,
        max_steps=1,
    )
    return SimpleNamespace(**{**args, **overrides})


def test_both_steps_have_the_same_report_py():
    assert (ROOT / "05_gpt_ddp/report.py").read_text() == (
        ROOT / "06_llama_ddp/report.py"
    ).read_text()


# What torch.cuda.get_device_name() returns on these cards, and their dense bf16 peaks.
REAL_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),  # not the SXM figure, though "H100" is in its name
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L40", 181e12),  # not L4's 121, though "L4" is in its name
    ("NVIDIA L4", 121e12),
]


@pytest.mark.parametrize("name, flops", REAL_NAMES)
def test_gpu_peak_is_the_exact_entry_for_the_device_name(monkeypatch, tmp_path, name, flops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = R.peak_flops_per_device(make_args(tmp_path), CUDA)
    assert peak == flops
    assert source.startswith(name)  # the line says which entry was used


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090", "NVIDIA H100"])
def test_unknown_gpu_asks_for_peak_flops_and_leaves_mfu_empty(monkeypatch, tmp_path, capsys, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(R, "peak_memory_gb", lambda device: 1.0)  # no GPU to ask
    log = R.TrainingLog(make_args(tmp_path), 0, 1000, 1e6, world_size=1, device=CUDA)
    log.train_step(1, 2.0, 1e-3, 1.0, 0.5, 0.01)
    log.close()
    out = capsys.readouterr().out
    assert f"peak per device for MFU: unknown ({name!r} is not in report.py's table: " in out
    assert "pass --peak_flops" in out
    assert "MFU nan%" in out
    # --peak_flops wins over the table on any GPU
    assert R.peak_flops_per_device(make_args(tmp_path, peak_flops=5e14), CUDA) == (
        5e14,
        "--peak_flops",
    )


def fake_speeds(monkeypatch, fp32, bf16):
    monkeypatch.setattr(R, "measure_cpu_matmul_flops", lambda n=1024: {"fp32": fp32, "bf16": bf16})


def start_log(tmp_path, capsys, **overrides):
    log = R.TrainingLog(make_args(tmp_path, **overrides), 0, 1000, 1e6, world_size=1, device=CPU)
    log.close()
    return capsys.readouterr().out


def test_bf16_hint_where_bf16_matmuls_are_at_least_twice_as_fast(monkeypatch, tmp_path, capsys):
    fake_speeds(monkeypatch, fp32=40e9, bf16=180e9)  # a CPU with AVX512-BF16 or AMX
    out = start_log(tmp_path, capsys)
    hints = [line for line in out.splitlines() if "--dtype bf16" in line]
    assert len(hints) == 1 and "bf16 matmuls are 4.5x faster than fp32" in hints[0]
    assert "peak per device for MFU: 0.040 TFLOP/s (measured matmul)" in out  # fp32 run
    # a run already in bf16: nothing to suggest
    assert "--dtype bf16" not in start_log(tmp_path, capsys, dtype="bf16")


@pytest.mark.parametrize("bf16", [1.0e9, 60e9, 79e9])  # no bf16 instructions; 1.5x; just < 2x
def test_no_bf16_hint_where_bf16_is_not_twice_as_fast(monkeypatch, tmp_path, capsys, bf16):
    fake_speeds(monkeypatch, fp32=40e9, bf16=bf16)
    out = start_log(tmp_path, capsys)
    assert "bf16" not in out
    assert "peak per device for MFU: 0.040 TFLOP/s (measured matmul)" in out


def test_bf16_training_on_cpu_measures_mfu_against_the_faster_path(monkeypatch, tmp_path):
    fake_speeds(monkeypatch, fp32=40e9, bf16=1e9)  # bf16 emulated: MFU must not flatter it
    assert R.peak_flops_per_device(make_args(tmp_path, dtype="bf16"), CPU)[0] == 40e9
    fake_speeds(monkeypatch, fp32=40e9, bf16=180e9)
    assert R.peak_flops_per_device(make_args(tmp_path, dtype="bf16"), CPU)[0] == 180e9


def test_the_real_cpu_measurement_gives_both_speeds():
    R.measure_cpu_matmul_flops.cache_clear()
    speeds = R.measure_cpu_matmul_flops(256)
    assert speeds["fp32"] > 0 and speeds["bf16"] > 0


def memory_lines(monkeypatch, capsys, have, **overrides):
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=have)
    )
    cfg = M.config_for("gpt-1.4b")
    n = 1_416_202_240  # its parameters (tests/test_05_gpt.py counts them)
    args = make_args(None, dtype="bf16", **overrides)
    R.print_memory_estimate(cfg, n, args, cfg.block_size, CUDA)
    out = capsys.readouterr().out
    total = float(out.split("total (estimate)")[1].split()[0]) * 1e9
    return out.splitlines()[-1], total


def test_fits_only_with_room_for_the_cuda_context_and_allocator_slack(monkeypatch, capsys):
    _, total = memory_lines(monkeypatch, capsys, have=80e9)
    need = total * 1.10 + 1e9  # 10 % allocator slack and 1 GB of CUDA context
    line, _ = memory_lines(monkeypatch, capsys, have=need + 0.05e9)
    assert line.endswith(": fits") and "1 GB of CUDA context" in line and "10% allocator" in line
    # 0.5 GB over the estimate itself: the CUDA context alone takes more than that
    line, _ = memory_lines(monkeypatch, capsys, have=total + 0.5e9)
    assert "does NOT fit" in line and "--activation_checkpointing" in line
    line, _ = memory_lines(monkeypatch, capsys, have=need - 0.05e9)
    assert "does NOT fit" in line


@pytest.mark.parametrize(
    "card, batch, checkpointing, fits",
    [  # the README's recommendations for gpt-1.4b in bf16, with the margins above
        (40e9, 2, False, True),
        (40e9, 4, False, False),
        (40e9, 8, True, True),
        (80e9, 8, False, True),
        (80e9, 16, False, True),
        (80e9, 32, True, True),
        (24e9, 1, True, False),  # weights, gradients and AdamW alone need 25 GB
    ],
)
def test_gpt_1_4b_recommendations(monkeypatch, capsys, card, batch, checkpointing, fits):
    line, _ = memory_lines(
        monkeypatch, capsys, card, batch_size=batch, activation_checkpointing=checkpointing
    )
    assert line.endswith(": fits") == fits, line
