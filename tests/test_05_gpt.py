"""Step 05: GPT pre-training with DDP (05_gpt_ddp/). All on CPU with the `tiny` preset."""

import csv
import json
import textwrap

import numpy as np
import pytest
import torch
from helpers import (
    PYTHON,
    free_port,
    import_step,
    run,
    script,
    torchrun,
    worker_env,
)

PREPARE, TRAIN, GENERATE = (script(f"05_gpt_ddp/{f}.py") for f in ("prepare", "train", "generate"))


M, PREP, REPORT, TRAIN_MOD = import_step("05_gpt_ddp", "model", "prepare", "report", "train")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded corpus (this Python's stdlib), byte tokenizer, capped at 400 kB."""
    d = tmp_path_factory.mktemp("gpt05") / "data"
    run(
        [PYTHON, PREPARE, "--tokenizer", "char", "--data_dir", d, "--max_bytes", 400_000],
        check=True,
    )
    return d


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return M.GPT(M.config_for("tiny", dropout=0.0))


def final_params(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# 1 -------------------------------------------------------------------------------------------


def test_preset_parameter_counts_on_meta_device():
    counts = {}
    for preset in ["gpt2-124m", "gpt-1.4b"]:
        with torch.device("meta"):  # shapes only: no memory for 1.4B parameters
            counts[preset] = M.num_params(M.GPT(M.config_for(preset)))
    assert counts["gpt2-124m"] == 124_439_808  # GPT-2 small as published (tied head)
    assert abs(counts["gpt-1.4b"] - 1.42e9) / 1.42e9 < 0.01
    big = M.config_for("gpt-1.4b")
    assert (big.vocab_size, big.block_size, big.n_embd, big.n_head, big.n_layer) == (
        50304,
        1024,
        2048,
        16,
        24,
    )
    assert not big.tie_weights and not big.bias and big.dropout == 0.1


# 2 -------------------------------------------------------------------------------------------


def test_causality_future_tokens_never_change_past_logits():
    model = tiny_model().eval()
    idx = torch.randint(0, 256, (2, 40))
    base, _ = model(idx)
    for t in [0, 17, 39]:
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits[:, t], base[:, t])  # the change is visible from t on


# 3 -------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch():
    x = torch.randint(0, 256, (8, 32))
    y = torch.randint(0, 256, (8, 32))
    no_autocast = torch.autocast("cpu", enabled=False)

    big = tiny_model()
    big_loss = TRAIN_MOD.forward_backward(big, [(x, y)], no_autocast)
    accum = tiny_model()
    micro = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    accum_loss = TRAIN_MOD.forward_backward(accum, micro, no_autocast)

    torch.testing.assert_close(accum_loss, big_loss)
    for (name, a), b in zip(accum.named_parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_runs_matmuls_in_bf16_but_keeps_fp32_weights_and_gradients():
    x = torch.randint(0, 256, (4, 32))
    y = torch.randint(0, 256, (4, 32))
    reference = tiny_model()
    ref_loss = TRAIN_MOD.forward_backward(reference, [(x, y)], torch.autocast("cpu", enabled=False))
    model = tiny_model()
    outputs = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda mod, inp, out: outputs.append(out.dtype))
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    loss = TRAIN_MOD.forward_backward(model, [(x, y)], bf16)
    assert outputs and set(outputs) == {torch.bfloat16}  # the matmuls ran in bf16
    for p, ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.dtype == p.grad.dtype == torch.float32  # fp32 master weights and gradients
        cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref.grad.flatten(), dim=0)
        assert cosine > 0.98  # the same gradient up to bf16 rounding
    assert abs(loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()


def test_activation_checkpointing_gives_the_same_gradients():
    x, y = torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32))
    grads = []
    for recompute in (False, True):
        model = tiny_model()
        model.activation_checkpointing = recompute
        TRAIN_MOD.forward_backward(model, [(x, y)], torch.autocast("cpu", enabled=False))
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_memory_estimate_for_the_big_preset():
    cfg = M.config_for("gpt-1.4b")
    n = 1_416_202_240
    full = M.memory_estimate(cfg, n, 8, 1024, "bf16", activation_checkpointing=False)
    ckpt = M.memory_estimate(cfg, n, 8, 1024, "bf16", activation_checkpointing=True)
    # fp32 weights + one fp32 gradient copy + AdamW m and v: 16 bytes per parameter
    static = ["parameters (fp32)", "gradients (fp32)", "AdamW states (fp32 m, v)"]
    assert sum(full[k] for k in static) == 16 * n
    # autocast's bf16 copies: every matmul weight, not the embedding tables nor the LayerNorms
    tables, norms = (50304 + 1024) * 2048, (2 * 24 + 1) * 2048
    assert full["bf16 weight copies (autocast)"] == 2 * (n - tables - norms)
    # 38 bytes per token per unit of width per layer on CUDA (tests/test_memory_estimates.py
    # checks the formula against the tensors autograd saves), 7 around the blocks
    assert full["activations"] == 8 * 1024 * 2048 * (24 * 38 + 7)
    assert ckpt["activations"] < full["activations"] / 5


def test_cpu_peak_for_bf16_is_never_below_the_fp32_peak():
    """MFU divides by this peak. On a CPU without bf16 instructions a bf16 matmul is ~100x slower
    than fp32 (measured here), and a bf16-only peak made MFU read 300-500 %."""
    fp32 = REPORT.measure_cpu_peak_flops("fp32", n=256)
    bf16 = REPORT.measure_cpu_peak_flops("bf16", n=256)
    assert bf16 >= 0.5 * fp32  # bf16 training is measured against the faster of the two paths


# 4 -------------------------------------------------------------------------------------------

ALLREDUCE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "05_gpt_ddp"))
    import model as M, train

    dist.init_process_group("gloo")
    rank, accum = dist.get_rank(), int(sys.argv[2])
    torch.manual_seed(0)
    net = M.GPT(M.config_for("tiny", dropout=0.0))
    ddp = DDP(net, gradient_as_bucket_view=True)
    calls = []
    def counting_allreduce(state, bucket):  # counts, then does DDP's normal all-reduce
        calls.append(1)
        return default_hooks.allreduce_hook(state, bucket)
    ddp.register_comm_hook(None, counting_allreduce)
    opt = train.make_optimizer(net, 1e-3, 0.1, torch.device("cpu"))
    off = torch.autocast("cpu", enabled=False)
    result = {"calls_per_step": [], "grads_equal": []}
    for step in range(3):
        gen = torch.Generator().manual_seed(100 * step + rank)  # different data on each rank
        batches = [(torch.randint(0, 256, (2, 16), generator=gen),) * 2 for _ in range(accum)]
        before = len(calls)
        train.forward_backward(ddp, batches, off)
        result["calls_per_step"].append(len(calls) - before)
        flat = torch.cat([p.grad.flatten() for p in net.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(everyone, flat)
        result["grads_equal"].append(torch.equal(everyone[0], everyone[1]))
        opt.step()
        opt.zero_grad(set_to_none=False)  # as train.py: .grad stays in DDP's buckets
    # the same micro-batches without no_sync: the hook must see one all-reduce per micro-batch
    before = len(calls)
    for x, y in batches:
        ddp(x, y)[1].backward()
    result["calls_without_no_sync"] = len(calls) - before
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()  # as train.py does before tearing down (docs/gloo_exit_abort.md)
    dist.destroy_process_group()
    time.sleep(0.1)  # train.py's workaround for gloo's exit abort (docs/gloo_exit_abort.md)
    """
)


@pytest.mark.slow
def test_one_gradient_allreduce_per_optimizer_step(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(ALLREDUCE_WORKER)
    accum = 4
    cmd = torchrun("--standalone", "--nproc_per_node=2", worker, tmp_path, accum)
    run(cmd, timeout=180, env=worker_env(), check=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # the tiny model's gradients fit one DDP bucket: one bucket all-reduce = one all-reduce
        assert result["calls_per_step"] == [1, 1, 1]
        assert result["calls_without_no_sync"] == accum
        assert result["grads_equal"] == [True, True, True]


# 5 -------------------------------------------------------------------------------------------


def complete_def(checkpoint, max_new_tokens):
    """generate.py's completion of the prompt "def " from `checkpoint`, on the CPU."""
    cmd = [PYTHON, GENERATE, "--checkpoint", checkpoint, "--prompt", "def "]
    cmd += ["--max_new_tokens", max_new_tokens, "--device", "cpu"]
    return run(cmd, timeout=120, check=True).stdout


@pytest.mark.slow
def test_two_rank_training_learns_and_writes_outputs(tmp_path, data_dir):
    out = tmp_path / "out"
    steps = 150
    cmd = torchrun(
        "--standalone", "--nproc_per_node=2", TRAIN, "--preset", "tiny", "--data_dir", data_dir,
        "--out_dir", out, "--max_steps", steps, "--batch_size", 8, "--grad_accum", 2,
        "--eval_every", 50, "--eval_batches", 4, "--save_every", 100, "--sample_every", steps,
        "--log_every", 50,
    )  # fmt: skip
    result = run(cmd, timeout=240, check=True)

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    train_rows = [r for r in rows if r["train_loss"]]
    assert len(val) == 4 and len(train_rows) == steps  # evals at 0, 50, 100, 150
    assert val[-1] < 0.6 * val[0], val  # from ~ln(256) = 5.5 to well under 3.3
    assert int(train_rows[-1]["tokens"]) == steps * 8 * 64 * 2 * 2  # batch x ctx x accum x ranks
    # rank 0 alone logs: each line exactly once
    assert result.stdout.count("| val loss") == 4
    assert result.stdout.count(f"step {steps:5d} | loss") == 1
    for name in ["loss.png", "loss.pdf", "ckpt.pt"]:
        assert (out / name).stat().st_size > 1000, name
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == steps and ckpt["world_size"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])

    text = complete_def(out / "ckpt.pt", 60).rstrip("\n")
    assert text.startswith("def ") and len(text.encode()) >= 40


@pytest.mark.slow
def test_compiled_model_saves_plain_keys_that_generate_loads(tmp_path, data_dir):
    out = tmp_path / "out"
    cmd = [
        PYTHON, TRAIN, "--preset", "tiny", "--compile", "--data_dir", data_dir, "--out_dir", out,
        "--max_steps", 4, "--eval_every", 4, "--eval_batches", 1, "--save_every", 4,
        "--sample_every", 0,
    ]  # fmt: skip
    run(cmd, timeout=300, check=True)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["model"].keys() == tiny_model().state_dict().keys()  # no "_orig_mod." prefix
    assert complete_def(out / "ckpt.pt", 10).startswith("def ")


# 7 -------------------------------------------------------------------------------------------


def test_gpt2_tokenizer_path_with_an_encoding_built_here(tmp_path, monkeypatch, capsys):
    import tiktoken

    # a byte-level BPE with two merges: "d"+"e" -> 256, "de"+"f" -> 257
    ranks = {bytes([i]): i for i in range(256)} | {b"de": 256, b"def": 257}
    enc = tiktoken.Encoding(
        name="test-bpe",
        pat_str=r"\S+|\s+",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 258},
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f(): pass\n" * 50)
    (corpus / "b.txt").write_text("def g(): return 1\n" * 50)
    PREP.main(["--input", str(corpus), "--data_dir", str(tmp_path / "data")])  # default: gpt2

    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 259 and meta["separator"] == 258
    train, val = ([], [])
    for name in ["a.txt", "b.txt"]:  # the last 10% of each document is validation data
        ids = enc.encode_ordinary((corpus / name).read_text()) + [258]
        cut = len(ids) - len(ids) // 10
        train, val = train + ids[:cut], val + ids[cut:]
    data = tmp_path / "data"
    assert np.fromfile(data / "train.bin", dtype=np.uint16).tolist() == train
    assert np.fromfile(data / "val.bin", dtype=np.uint16).tolist() == val
    assert 257 in train  # the merge was used
    # train.py decodes samples from meta.json alone, without tiktoken
    assert TRAIN_MOD.decode(train[:3], meta) == "def f"  # 3 tokens: "def" " " "f"


def test_gpt2_tokenizer_offline_gives_one_line_error(tmp_path):
    env = worker_env(
        TIKTOKEN_CACHE_DIR=tmp_path / "empty-cache",
        # every download goes to a closed local port: nothing leaves this machine
        HTTPS_PROXY=f"http://127.0.0.1:{free_port()}",
        HTTP_PROXY=f"http://127.0.0.1:{free_port()}",
    )
    for var in ["NO_PROXY", "no_proxy", "https_proxy", "http_proxy"]:
        env.pop(var, None)
    result = run([PYTHON, PREPARE, "--data_dir", tmp_path / "data"], timeout=120, env=env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("prepare.py: error: cannot load tiktoken's GPT-2 vocabulary")
    assert "TIKTOKEN_CACHE_DIR" in result.stderr and "--tokenizer char" in result.stderr
    assert not (tmp_path / "data" / "train.bin").exists()


# 8 -------------------------------------------------------------------------------------------


def train_error(*args):
    """train.main's exit message for bad input (same text it prints on stderr)."""
    with pytest.raises(SystemExit) as exc:
        TRAIN_MOD.main([str(a) for a in args])
    return exc.value.code


def test_unknown_preset_is_rejected_in_one_line(data_dir):
    result = run([PYTHON, TRAIN, "--preset", "gpt-9000", "--data_dir", data_dir], timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.py: error: argument --preset: invalid choice: 'gpt-9000'" in result.stderr


def test_missing_empty_and_too_short_data(tmp_path):
    missing = train_error("--data_dir", tmp_path / "nothing")
    assert missing == (
        f"train.py: error: {tmp_path / 'nothing' / 'meta.json'} not found; "
        f"run prepare.py --data_dir {tmp_path / 'nothing'} first"
    )

    short = tmp_path / "short"
    (tmp_path / "short.txt").write_text("x = 1\n")  # fewer tokens than one 65-token block
    run([PYTHON, PREPARE, "--tokenizer", "char", "--input", tmp_path / "short.txt",
         "--data_dir", short], timeout=60, check=True)  # fmt: skip
    message = train_error("--data_dir", short, "--out_dir", tmp_path / "out")
    assert message.startswith(f"train.py: error: {short / 'train.bin'} holds 7 tokens")
    assert "fewer than one block of 65" in message

    (short / "train.bin").write_bytes(b"")
    assert "holds 0 tokens" in train_error("--data_dir", short)

    (tmp_path / "empty").mkdir()
    message = run([PYTHON, PREPARE, "--input", tmp_path / "empty"], timeout=60)
    assert message.returncode == 1
    assert message.stderr == f"prepare.py: error: no text found in {tmp_path / 'empty'}" + (
        f" (suffixes read: {PREP.TEXT_SUFFIXES})\n"
    )


def test_bad_checkpoints_are_refused_and_never_overwritten(tmp_path, data_dir):
    out = tmp_path / "out"
    common = ["--data_dir", data_dir, "--out_dir", out, "--eval_batches", 1, "--sample_every", 0]
    TRAIN_MOD.main([str(a) for a in [*common, "--max_steps", 2]])
    ckpt = out / "ckpt.pt"
    good = ckpt.read_bytes()

    assert train_error(*common, "--max_steps", 4) == (
        f"train.py: error: {ckpt} exists; pass --resume to continue it, or choose another --out_dir"
    )
    assert train_error(*common, "--resume", "--preset", "small") == (
        f"train.py: error: {ckpt} holds a 'tiny' model (vocabulary 256), not --preset small with "
        "this data (vocabulary 256); use --preset tiny and the same data, or another --out_dir"
    )
    ckpt.write_bytes(good[: len(good) // 2])  # a crash while copying it, say
    message = train_error(*common, "--resume")
    assert message.startswith(f"train.py: error: cannot read checkpoint {ckpt} (")
    assert ckpt.read_bytes() == good[: len(good) // 2]  # left as it was

    torch.save({"weights": torch.zeros(3)}, ckpt)  # a foreign checkpoint
    assert train_error(*common, "--resume") == (
        f"train.py: error: {ckpt} is not a 05_gpt_ddp checkpoint; use another --out_dir"
    )
    result = run([PYTHON, GENERATE, "--checkpoint", ckpt, "--device", "cpu"], timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"generate.py: error: {ckpt} is not a checkpoint written by train.py\n"
