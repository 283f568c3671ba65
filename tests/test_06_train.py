"""Step 06 training: a 2-rank torchrun run of the tiny Llama on toy .pkl files (loss, artifacts),
and the one-line errors of 06_llama_ddp/train.py on bad input. The exact resume after a SIGKILL,
with 4 ranks: tests/test_05_06_cluster.py."""

import csv
import os
import pickle

import pytest
import torch
from helpers import (
    PYTHON,
    run,
    script,
    torchrun,
)

TRAIN = script("06_llama_ddp/train.py")
TINY = ["--preset", "tiny", "--batch_size", "4", "--seq_len", "32", "--lr", "3e-3"]
TINY += ["--warmup_steps", "5", "--log_every", "5", "--sample_every", "0", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_data")
    run(
        [PYTHON, script("06_llama_ddp/make_toy_data.py"), "--out_dir", folder,
         "--max_bytes", "300000"],
        timeout=60,
        check=True,
    )  # fmt: skip
    return folder


def data_args(folder):
    return ["--train_file", folder / "train.pkl", "--valid_file", folder / "val.pkl"]


def two_ranks(*args, torchrun_flags=("--nproc-per-node=2",)):
    return torchrun("--standalone", *torchrun_flags, TRAIN, *args)


def final_weights(out_dir):
    return torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_two_ranks_learn_and_write_their_artifacts(toy_data, tmp_path):
    out = tmp_path / "out"
    args = [*TINY, *data_args(toy_data), "--max_steps", "40", "--grad_accum", "2"]
    # samples run on rank 0 alone (overriding TINY's --sample_every 0): no collective in them
    args += ["--eval_every", "20", "--eval_batches", "4", "--sample_every", "20", "--out_dir", out]
    result = run(two_ranks(*args, torchrun_flags=["--nproc_per_node=2"]), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 3  # steps 0, 20, 40
    assert val[0] > 5.0  # about ln(256): a uniform guess over bytes
    assert val[-1] < val[0] - 1.5, val
    train_rows = [r for r in rows if r["train_loss"]]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 41))
    # global tokens per step = batch 4 x seq_len 32 x accumulation 2 x 2 ranks
    assert all(int(r["tokens"]) == 512 * int(r["step"]) for r in train_rows)
    assert all(float(r["tokens_per_s"]) > 0 and 0 < float(r["mfu"]) < 1 for r in train_rows)
    for name in ("loss.png", "loss.pdf"):
        assert (out / name).stat().st_size > 1000
    ckpt = final_weights(out)
    assert ckpt["step"] == 40
    assert ckpt["loader"] == {"batches_taken": 80}  # 40 steps x 2 micro-batches
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert "tok/s" in result.stdout and "MFU" in result.stdout
    assert (
        "--- sample at step 20 ---" in result.stdout
        and "--- sample at step 40 ---" in result.stdout
    )


def python_train(*args, tmp_path):
    return run([PYTHON, TRAIN, *TINY, "--out_dir", tmp_path / "out", *args], timeout=120)


def assert_one_line_error(result, message):
    """sys.exit's single line; argparse prints its usage first, the error is then the last line."""
    assert result.returncode != 0
    last = result.stderr.splitlines()[-1] if result.stderr else ""
    assert last.startswith("train.py: error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr
    if not result.stderr.startswith("usage:"):
        assert result.stderr == last + "\n"


@pytest.mark.slow
def test_one_process_without_torchrun_trains_and_resumes(toy_data, tmp_path):
    common = [*data_args(toy_data), "--max_steps", "6", "--eval_every", "3", "--eval_batches", "2"]
    first = python_train(*common, tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    assert final_weights(tmp_path / "out")["loader"] == {"batches_taken": 6}
    again = python_train(*common, tmp_path=tmp_path)
    assert_one_line_error(again, "out/ckpt.pt exists; pass --resume to continue it")
    longer = python_train(*data_args(toy_data), "--max_steps", "8", "--resume", tmp_path=tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert "resuming from" in longer.stdout and "at step 6" in longer.stdout
    assert final_weights(tmp_path / "out")["loader"] == {"batches_taken": 8}


def write(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return path


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_bad_inputs_give_one_clear_line(toy_data, tmp_path):
    """The file problems the readers detect (tests/test_06_data.py has them all) end train.py with
    one line and no traceback; a few of them here."""
    val = ["--valid_file", toy_data / "val.pkl"]
    missing = python_train("--train_file", tmp_path / "nope.pkl", *val, tmp_path=tmp_path)
    assert_one_line_error(missing, f"{tmp_path / 'nope.pkl'}: no such file")

    short = write(tmp_path / "short.pkl", list(range(100)))
    assert_one_line_error(
        python_train("--train_file", short, *val, tmp_path=tmp_path),
        f"{short}: 100 tokens are fewer than one window per rank (world_size 1 x batch_size 4 x "
        "seq_len 32 + 1 = 129)",
    )

    too_big = write(tmp_path / "big.pkl", list(range(300)) * 10)
    assert_one_line_error(
        python_train("--train_file", too_big, *val, tmp_path=tmp_path),
        "token id 299 is outside the model's vocabulary of 256",
    )

    marker = tmp_path / "payload_ran"
    evil = write(tmp_path / "evil.pkl", Payload(marker))
    assert_one_line_error(
        python_train("--train_file", evil, *val, tmp_path=tmp_path),
        "refusing to load this pickle: it wants to call posix.system",
    )
    assert not marker.exists()

    assert_one_line_error(
        python_train(*data_args(toy_data), "--seq_len", "65", tmp_path=tmp_path),
        "--seq_len must be between 1 and 64, the tiny preset's context",
    )


def test_a_foreign_or_truncated_checkpoint_is_refused_and_kept(toy_data, tmp_path):
    (tmp_path / "out").mkdir()
    ckpt = tmp_path / "out" / "ckpt.pt"
    for content in (b"not a checkpoint", None):
        if content is None:  # a valid torch file, but not ours
            torch.save({"weights": torch.zeros(3)}, ckpt)
        else:
            ckpt.write_bytes(content)
        before = ckpt.read_bytes()
        result = python_train(*data_args(toy_data), "--resume", tmp_path=tmp_path)
        assert_one_line_error(result, str(ckpt))
        assert ckpt.read_bytes() == before
