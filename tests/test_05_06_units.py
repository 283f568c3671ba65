"""Small properties of steps 05 and 06 that only the README's printed numbers pinned before: each
rank of 05 draws its own training windows, the learning-rate schedule at its ends, and the
direction in which RoPE rotates."""

import json
import math
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import PYTHON, ROOT, import_step, load_script, run, script, torchrun

FOLDERS = {"05": "05_gpt_ddp", "06": "06_llama_ddp"}
TRAIN = {step: import_step(folder, "train") for step, folder in FOLDERS.items()}
LLAMA = load_script("06_llama_ddp/model.py", "units06_model_rope")


# the learning-rate schedule ---------------------------------------------------------------------


@pytest.mark.parametrize("step", ["05", "06"])
def test_lr_warms_up_from_the_first_step_and_decays_to_a_tenth(step):
    lr_at = TRAIN[step].lr_at
    args = SimpleNamespace(warmup_steps=10, max_steps=110)
    max_lr = 1e-3
    # warm-up: step 0 already trains (lr > 0), and step warmup - 1 reaches the peak
    assert lr_at(0, args, max_lr) == pytest.approx(max_lr / 10)
    assert lr_at(4, args, max_lr) == pytest.approx(max_lr / 2)
    assert lr_at(9, args, max_lr) == pytest.approx(max_lr)
    # the cosine starts at the peak and ends at max_lr / 10, not 0, and stays there
    assert lr_at(10, args, max_lr) == pytest.approx(max_lr)
    assert lr_at(60, args, max_lr) == pytest.approx(max_lr * (0.1 + 0.9 * 0.5))  # half-way
    assert lr_at(110, args, max_lr) == pytest.approx(max_lr / 10)
    assert lr_at(500, args, max_lr) == pytest.approx(max_lr / 10)
    # it never rises after the warm-up
    lrs = [lr_at(s, args, max_lr) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    # no warm-up: the first step runs at the peak
    assert lr_at(0, SimpleNamespace(warmup_steps=0, max_steps=100), max_lr) == pytest.approx(max_lr)


# RoPE's direction -------------------------------------------------------------------------------


def test_rope_rotates_the_standard_way():
    """RoPE (Su et al., 2021) multiplies the pair (x_i, x_{i + d/2}), read as x_i + j x_{i + d/2},
    by e^{j m theta_i} at position m, with theta_i = base^(-2i/d): the unit vector (1, 0) at
    position m becomes (cos m theta_i, sin m theta_i), and (0, 1) becomes (-sin, cos). A rotation
    the other way would still depend on relative positions only, so only this pins it."""
    head_dim, T, base = 8, 5, 10000.0
    half = head_dim // 2
    cos, sin = LLAMA.rope_tables(head_dim, T, base)
    for i in range(half):
        theta = base ** (-2 * i / head_dim)
        for first in (True, False):
            x = torch.zeros(1, 1, T, head_dim)
            x[..., i if first else i + half] = 1.0  # the same unit vector at every position
            out = LLAMA.apply_rope(x, cos, sin)[0, 0]
            for m in range(T):
                c, s = math.cos(m * theta), math.sin(m * theta)
                want = (c, s) if first else (-s, c)
                got = (out[m, i].item(), out[m, i + half].item())
                assert got == pytest.approx(want, abs=1e-5), (i, m, first)
                # nothing leaks into the other pairs
                rest = torch.cat([out[m, :i], out[m, i + 1 : i + half], out[m, i + half + 1 :]])
                assert rest.abs().max() == 0
    # the model builds its tables from its config's theta: at position 1, frequency 0 is 1 radian
    model = LLAMA.Llama(LLAMA.config_for("tiny"))
    assert model.rope_cos[1, 0].item() == pytest.approx(math.cos(1.0))
    assert model.rope_sin[1, 0].item() == pytest.approx(math.sin(1.0))


# 05: every rank its own windows -----------------------------------------------------------------

# train.py under torchrun, with get_batch wrapped to record the first window start of every
# micro-batch each rank draws for training (validation batches use other keys and are left out)
RECORDER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {folder!r})
    import train

    drawn, get_batch = [], train.get_batch

    def recording(tokens, batch_size, block_size, device, *keys, **options):
        x, y = get_batch(tokens, batch_size, block_size, device, *keys, **options)
        if keys[1] == train.TRAIN_STREAM:
            drawn.append(x[:, :8].tolist())
        return x, y

    train.get_batch = recording
    train.main(sys.argv[1:])
    with open(os.path.join({out!r}, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(drawn, f)
    """
)


@pytest.fixture(scope="module")
def gpt_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("units05") / "data"
    prepare = script("05_gpt_ddp/prepare.py")
    cmd = [PYTHON, prepare, "--tokenizer", "char", "--data_dir", d, "--max_bytes", 100_000]
    run(cmd, check=True)
    return d


@pytest.mark.slow  # one 3-rank torchrun run: about 10 s
def test_05_ranks_draw_different_windows_at_every_step(tmp_path, gpt_data):
    world, steps = 3, 2
    wrapper = tmp_path / "record.py"
    wrapper.write_text(RECORDER.format(folder=str(ROOT / "05_gpt_ddp"), out=str(tmp_path)))
    cmd = torchrun(
        "--standalone", f"--nproc_per_node={world}", wrapper, "--data_dir", gpt_data,
        "--out_dir", tmp_path / "out", "--max_steps", steps, "--batch_size", 4,
        "--grad_accum", 2, "--eval_batches", 1, "--sample_every", 0, "--dtype", "fp32",
    )  # fmt: skip
    run(cmd, timeout=240, check=True)
    drawn = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(len(d) == steps * 2 for d in drawn)  # steps x micro-batches, per rank
    for i in range(steps * 2):
        windows = [np.array(d[i]) for d in drawn]
        for a in range(world):
            for b in range(a + 1, world):
                assert not np.array_equal(windows[a], windows[b]), (i, a, b)
    # and a rank's windows change from one step to the next (the step is in the keys)
    for d in drawn:
        assert not np.array_equal(np.array(d[0]), np.array(d[2]))
