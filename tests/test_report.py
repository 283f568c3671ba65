"""report.py (the same file in 05_gpt_ddp/ and 06_llama_ddp/): the MFU peak of a GPU, the bf16 hint
on CPUs, and the fits / does-not-fit verdict of the memory estimate. No GPU is needed: the CUDA
queries are replaced by what real cards return."""

from types import SimpleNamespace

import pytest
import torch
from helpers import PYTHON, import_step, run, script

M, R = import_step("05_gpt_ddp", "model", "report")
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
        tensorboard=False,
    )
    return SimpleNamespace(**{**args, **overrides})


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
    peak, source = R.peak_flops_per_device(make_args(tmp_path, dtype="bf16"), CUDA)
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


def memory_lines(monkeypatch, capsys, have, world_size=1, major=9, **overrides):
    """The estimate's last line and total for gpt-1.4b in bf16 on a GPU of `have` bytes."""
    props = SimpleNamespace(total_memory=have, major=major)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = M.config_for("gpt-1.4b")
    n = 1_416_202_240  # its parameters (tests/test_05_gpt.py counts them)
    args = make_args(None, dtype="bf16", **overrides)
    R.print_memory_estimate(cfg, n, args, cfg.block_size, CUDA, world_size)
    out = capsys.readouterr().out
    total = float(out.split("total (estimate)")[1].split()[0]) * 1e9
    return out.splitlines()[-1], total


def test_fits_only_with_room_for_the_cuda_context_and_allocator_slack(monkeypatch, capsys):
    _, total = memory_lines(monkeypatch, capsys, have=80e9)
    need = total * 1.10 + 1e9  # 10 % allocator slack and 1 GB of CUDA context
    line, _ = memory_lines(monkeypatch, capsys, have=need + 0.05e9)
    assert line.endswith(": fits") and "10% allocator slack" in line
    assert "at 1 rank(s), 1.0 GB CUDA context:" in line  # one process: no NCCL
    # 0.5 GB over the estimate itself: the CUDA context alone takes more than that
    line, _ = memory_lines(monkeypatch, capsys, have=total + 0.5e9)
    assert "does NOT fit" in line and "--activation_checkpointing" in line
    line, _ = memory_lines(monkeypatch, capsys, have=need - 0.05e9)
    assert "does NOT fit" in line


@pytest.mark.parametrize(
    "world_size, major, outside",
    [  # GB outside PyTorch's allocator: CUDA context, NCCL's peer buffers, NVLS on Hopper+
        (1, 9, 1.0),
        (2, 9, 1.7),  # NCCL uses NVLS only above 2 ranks
        (2, 8, 1.7),
        (8, 8, 1.7),  # an A100 has no NVLS
        (4, 9, 4.2),
        (8, 9, 4.2),
        (8, 10, 4.2),
    ],
)
def test_the_margin_grows_with_the_world_size(monkeypatch, capsys, world_size, major, outside):
    _, total = memory_lines(monkeypatch, capsys, have=80e9)
    need = total * 1.10 + outside * 1e9
    for have, fits in [(need + 0.05e9, True), (need - 0.05e9, False)]:
        line, _ = memory_lines(monkeypatch, capsys, have, world_size=world_size, major=major)
        assert line.endswith(": fits") == fits, line
        assert f"at {world_size} rank(s), 1.0 GB CUDA context" in line
        assert ("0.7 GB NCCL" in line) == (world_size > 1)
        assert ("2.5 GB NCCL's NVLS buffers" in line) == (outside > 2)


# the README's and docs/gpu_numbers.md's recommendations for gpt-1.4b in bf16, on 8 GPUs: an A100
# 40 GB (no NVLS), an H100 80 GB (with NVLS), and a 24 GB card
RECOMMENDATIONS = [
    ("NVIDIA A100-SXM4-40GB", 2, False, True),
    ("NVIDIA A100-SXM4-40GB", 4, False, False),
    ("NVIDIA A100-SXM4-40GB", 8, True, True),
    ("NVIDIA A100-SXM4-40GB", 16, True, False),
    ("NVIDIA H100 80GB HBM3", 16, False, True),
    ("NVIDIA H100 80GB HBM3", 32, False, False),
    ("NVIDIA H100 80GB HBM3", 32, True, True),
    ("24GB", 1, True, False),  # weights, gradients and AdamW alone need 25 GB
]


@pytest.mark.parametrize("gpu, batch, checkpointing, fits", RECOMMENDATIONS)
def test_gpt_1_4b_recommendations(capsys, gpu, batch, checkpointing, fits):
    """What --plan prints for 8 ranks: the datasheet's memory, not what a card reports (a bit
    more), so a plan that fits here fits the card."""
    card, error = R.find_gpu(gpu)
    assert error is None
    cfg = M.config_for("gpt-1.4b")
    args = make_args(None, dtype="bf16", batch_size=batch, activation_checkpointing=checkpointing)
    R.print_memory_estimate(cfg, 1_416_202_240, args, cfg.block_size, None, 8, card)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.endswith(": fits") == fits, line


# --plan: any GPU of the table, named loosely ------------------------------------------------------


@pytest.mark.parametrize(
    "text, name",
    [
        ("H100 80GB", "NVIDIA H100 80GB HBM3"),
        ("nvidia h100 80gb hbm3", "NVIDIA H100 80GB HBM3"),
        ("H200", "NVIDIA H200"),  # the exact name wins over "H200 NVL"
        ("A100 SXM4 40GB", "NVIDIA A100-SXM4-40GB"),
        ("L4", "NVIDIA L4"),  # not the L40 or L40S
        ("24GB", "a 24 GB GPU"),
        ("80 gb", "a 80 GB GPU"),
    ],
)
def test_plan_finds_the_gpu(text, name):
    gpu, error = R.find_gpu(text)
    assert error is None and gpu.name == name


@pytest.mark.parametrize(
    "text, why", [("H100", "is more than one GPU"), ("RTX 4090", "is not a GPU"), ("", "is not")]
)
def test_plan_refuses_a_gpu_it_cannot_tell(text, why):
    gpu, error = R.find_gpu(text)
    assert gpu is None and why in error and "NVIDIA H100 PCIe" in error and "24GB" in error


@pytest.mark.parametrize(
    "step, args, fits",
    [
        ("05", ["--preset", "gpt-1.4b", "--batch_size", "16", "--plan", "H100 80GB"], True),
        (
            "06",
            ["--preset", "tinyllama-1.1b", "--batch_size", "4", "--plan", "A100 SXM4 40GB"],
            False,
        ),
    ],
)
def test_plan_prints_the_estimate_and_verdict_without_data_or_gpu(tmp_path, step, args, fits):
    folder = {"05": "05_gpt_ddp", "06": "06_llama_ddp"}[step]
    nothing = ["--data_dir", tmp_path] if step == "05" else ["--train_file", tmp_path / "no.pkl"]
    result = run(
        [PYTHON, script(f"{folder}/train.py"), *args, *nothing, "--out_dir", tmp_path / "out"],
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"plan: {args[1]}, ") and ", bf16, " in lines[0]  # as on a GPU
    assert lines[0].endswith("8 rank(s) on " + R.find_gpu(args[-1])[0].name)
    verdict = next(line for line in lines if "allocator slack" in line)
    assert verdict.endswith(": fits") == fits
    assert "at 8 rank(s), 1.0 GB CUDA context + 0.7 GB NCCL" in verdict
    assert lines[-1].startswith("peak per device for MFU: ")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


# MFU -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, bf16", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)]
)
def test_fp32_runs_are_measured_against_the_tf32_peak(monkeypatch, tmp_path, name, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80e9, major=9)
    )
    peak, source = R.peak_flops_per_device(make_args(tmp_path, dtype="fp32"), CUDA)
    assert peak == bf16 / 2 and "dense TF32" in source  # H100 SXM: 494.7 of 989.4 dense
    peak, source = R.peak_flops_per_device(make_args(tmp_path, dtype="bf16"), CUDA)
    assert peak == bf16 and "dense bf16" in source


def logged_mfu(tmp_path, capsys, device, flops_per_token, seconds=0.5):
    """One logged step of 1,000 tokens: (MFU in metrics.csv, the printed MFU, all output)."""
    log = R.TrainingLog(make_args(tmp_path), 0, 1000, flops_per_token, world_size=2, device=device)
    log.train_step(1, 2.0, 1e-3, 1.0, seconds, 0.01)
    log.close()
    out = capsys.readouterr().out
    with open(tmp_path / "metrics.csv") as f:
        mfu = float(f.read().splitlines()[-1].split(",")[9])
    printed = float(out.split("| MFU ")[1].split("%")[0])
    return mfu, printed, out


@pytest.mark.parametrize(
    "again, want",
    [  # fp32 peak measured at start-up: 1 GFLOP/s per rank, under load; the step did 2 per rank
        (4e9, 0.5),  # measured again on a quieter CPU: MFU against that
        (1.5e9, 1.0),  # still slowed down: the step itself shows the CPU does at least 2
    ],
)
def test_cpu_mfu_never_exceeds_100_percent(monkeypatch, tmp_path, capsys, again, want):
    fake_speeds(monkeypatch, fp32=1e9, bf16=0.5e9)
    monkeypatch.setattr(R, "matmul_flops", lambda dtypes, n, seconds: {"fp32": again})
    # 1,000 tokens in 0.5 s at 2 MFLOP per token: 4 GFLOP/s on 2 ranks, 2 per rank
    mfu, printed, out = logged_mfu(tmp_path, capsys, CPU, flops_per_token=2e6)
    assert mfu == pytest.approx(want) and printed == pytest.approx(100 * want)
    assert "more than the matmul measured at start-up (0.001;" in out
    # the larger peak stays: a step as fast again is now within 100 %
    log = R.TrainingLog(make_args(tmp_path), 0, 1000, 2e6, world_size=2, device=CPU)
    log.peak = max(again, 2e9)
    assert log.mfu(4e9) == pytest.approx(want)
    log.close()


def test_a_datasheet_peak_below_the_run_is_said_to_be_wrong(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=24e9, major=8)
    )
    monkeypatch.setattr(R, "peak_memory_gb", lambda device: 1.0)  # no GPU to ask
    # fp32 on an L4: against 60.5 TFLOP/s of TF32; 1,000 tokens in 1 ms at 100 MFLOP each on
    # 2 ranks is 50 TFLOP/s per rank: below, no note
    mfu, printed, out = logged_mfu(tmp_path, capsys, CUDA, flops_per_token=1e8, seconds=1e-3)
    assert printed == pytest.approx(82.6, abs=0.1) and "note: MFU above 100%" not in out
    # twice as fast: above 100 % (a wrong peak or a wrong clock), printed with the reason
    mfu, printed, out = logged_mfu(tmp_path, capsys, CUDA, flops_per_token=2e8, seconds=1e-3)
    assert printed > 100
    assert "note: MFU above 100%: this run does more FLOP/s than the peak it divides by" in out


def test_measuring_the_cpu_leaves_the_training_random_numbers_alone():
    """The peak is measured again mid-run on rank 0 only: it must not draw from torch's global
    generator, or rank 0's random numbers would depend on when the machine was busy."""
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    R.matmul_flops(["fp32", "bf16"], 64, seconds=0.01)
    assert torch.equal(torch.rand(3), want)
