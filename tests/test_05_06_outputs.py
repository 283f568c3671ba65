"""What steps 05 and 06 give back besides the weights: generate.py completes a prompt from either
checkpoint train.py writes, reads only the weights (never the optimizer state), and 06 prints
text, never control bytes; --tensorboard writes the scalars of metrics.csv; train.py says how many
passes over its training data the run makes."""

import contextlib
import csv
import importlib
import io
import json
import sys
import textwrap
import unicodedata
from types import SimpleNamespace

import pytest
import torch
from helpers import PYTHON, ROOT, import_step, run, script

FOLDERS = {"05": "05_gpt_ddp", "06": "06_llama_ddp"}
NAMES = ("model", "report", "train", "generate")


S05 = dict(zip(NAMES, import_step("05_gpt_ddp", *NAMES), strict=True))
S06 = dict(zip(NAMES, import_step("06_llama_ddp", *NAMES), strict=True))
STEPS = {"05": S05, "06": S06}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model of each step trained for a few steps in this process on a byte corpus, with
    --tensorboard: {step: (out_dir, what train.py printed)}."""
    tmp = tmp_path_factory.mktemp("outputs")
    run(
        [PYTHON, script("05_gpt_ddp/prepare.py"), "--tokenizer", "char", "--data_dir",
         tmp / "gpt", "--max_bytes", 100_000],
        check=True,
    )  # fmt: skip
    run(
        [PYTHON, script("06_llama_ddp/make_toy_data.py"), "--out_dir", tmp / "llama",
         "--max_bytes", 100_000],
        check=True,
    )  # fmt: skip
    common = ["--max_steps", "10", "--eval_every", "5", "--eval_batches", "1", "--batch_size"]
    common += ["4", "--sample_every", "0", "--device", "cpu", "--dtype", "fp32", "--tensorboard"]
    files = {
        "05": ["--data_dir", str(tmp / "gpt")],
        "06": ["--train_file", str(tmp / "llama/train.pkl")]
        + ["--valid_file", str(tmp / "llama/val.pkl")],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the other tests' workers: the cores are shared
    runs = {}
    try:
        for step in ("05", "06"):
            out, printed = tmp / f"out{step}", io.StringIO()
            with contextlib.redirect_stdout(printed):
                STEPS[step]["train"].main([*files[step], "--out_dir", str(out), *common])
            runs[step] = (out, printed.getvalue())
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.fixture(scope="module")
def checkpoints(trained):
    return {step: out / "ckpt.pt" for step, (out, _) in trained.items()}


def generate(capsys, step, *args):
    capsys.readouterr()
    STEPS[step]["generate"].main(["--device", "cpu", *map(str, args)])
    return capsys.readouterr().out


@pytest.mark.parametrize("step", ["05", "06"])
def test_greedy_completion_is_the_trained_models_own(checkpoints, capsys, step, tmp_path):
    """The completion is the prompt followed by what the saved weights predict, token by token
    (greedy, so nothing random), from ckpt.pt or from a copy under another name (best.pt)."""
    text = generate(capsys, step, "--checkpoint", checkpoints[step], "--prompt", "def ",
                    "--max_new_tokens", 12, "--temperature", 0)  # fmt: skip
    ckpt = torch.load(checkpoints[step], map_location="cpu", weights_only=True)
    m = STEPS[step]["model"]
    if step == "05":
        model, prefix = m.GPT(m.GPTConfig(**ckpt["config"])), []
    else:
        model, prefix = m.Llama(m.LlamaConfig(**ckpt["config"])), [0]  # a document starts
    model.load_state_dict(ckpt["model"])
    model.eval()
    idx = torch.tensor([prefix + list(b"def ")])
    want = model.generate(idx, 12, temperature=0)[0, len(prefix) :].tolist()
    if step == "05":
        assert text == bytes(want).decode("utf-8", errors="replace") + "\n"
    else:
        assert text == S06["train"].decode(want, 256) + "\n"
    best = tmp_path / "best.pt"
    best.write_bytes(checkpoints[step].read_bytes())
    again = generate(capsys, step, "--checkpoint", best, "--prompt", "def ",
                     "--max_new_tokens", 12, "--temperature", 0)  # fmt: skip
    assert again == text


@pytest.mark.parametrize("step", ["05", "06"])
def test_help_names_both_checkpoints(step, capsys):
    with pytest.raises(SystemExit):
        STEPS[step]["generate"].parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "out/ckpt.pt (the last save) or out/best.pt (best val loss)" in out


# Loads generate.py's load_weights of each step from a checkpoint whose optimizer state was
# made 200 MB larger, and prints how much the peak resident set (Linux's VmHWM, which writing 5
# to /proc/self/clear_refs resets to the current resident set) grew while loading.
RSS_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_05_06_outputs import STEPS

    def peak_rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    grown = {{}}
    for step, path in json.loads(sys.argv[1]).items():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = peak_rss()
        ckpt = STEPS[step]["generate"].load_weights(path)
        assert set(ckpt) >= {{"model", "config"}} and "optimizer" not in ckpt
        assert all(t.device.type == "cpu" for t in ckpt["model"].values())
        del ckpt
        grown[step] = peak_rss() - before
    print(json.dumps(grown))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's /proc/self/status")
def test_only_the_weights_are_read(checkpoints, tmp_path):
    paths = {}
    for step, path in checkpoints.items():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = next(iter(ckpt["optimizer"]["state"].values()))
        state["exp_avg"] = torch.ones(50_000_000)  # 200 MB: as if the model were large
        paths[step] = str(tmp_path / f"big{step}.pt")
        torch.save(ckpt, paths[step])
    probe = RSS_PROBE.format(tests=str(ROOT / "tests"))
    result = run([PYTHON, "-c", probe, json.dumps(paths)], timeout=120, check=True)
    grown = json.loads(result.stdout.splitlines()[-1])
    for step in checkpoints:
        assert grown[step] < 50e6, f"{step}: the resident set grew by {grown[step] / 1e6:.0f} MB"


def test_06_prints_text_and_never_control_bytes():
    decode = S06["train"].decode
    # id 0 separates documents; escape, carriage return and backspace would act on a terminal;
    # 0xff is not UTF-8
    text = decode([0, 104, 105, 27, 13, 8, 9, 10, 0xFF, 0xC3, 0xA9], 256)
    assert text == "\nhi\ufffd\ufffd\ufffd\t\n\ufffdé"
    every_byte = decode(list(range(256)), 256)
    controls = {c for c in every_byte if unicodedata.category(c) == "Cc"}
    assert controls <= {"\n", "\t"}
    # a vocabulary that is not bytes: the ids, for the tokenizer that made the token files
    assert decode([1, 300, 7], 32000) == "1 300 7"


def test_06_other_vocabularies_take_and_give_token_ids(tmp_path, capsys):
    m = S06["model"]
    cfg = m.config_for("tiny", vocab_size=320)
    torch.manual_seed(0)
    model = m.Llama(cfg)
    path = tmp_path / "ckpt.pt"
    state = {"format": m.CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": {}}
    torch.save({**state, "config": cfg.__dict__}, path)
    out = generate(capsys, "06", "--checkpoint", path, "--prompt", "1 300 7",
                   "--max_new_tokens", 5)  # fmt: skip
    ids = [int(t) for t in out.split()]
    assert ids[:3] == [1, 300, 7] and len(ids) == 8 and max(ids) < 320
    for prompt in ["def ", "1 320"]:  # text, or an id past the vocabulary
        with pytest.raises(SystemExit) as e:
            generate(capsys, "06", "--checkpoint", path, "--prompt", prompt)
        assert e.value.code == (
            "generate.py: error: this model's vocabulary has 320 ids, not 256 bytes: give "
            "--prompt as token ids between 0 and 319, separated by spaces"
        )


@pytest.mark.parametrize("step", ["05", "06"])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, step):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:  # sys.exit(message): one line on stderr, exit 1
        STEPS[step]["generate"].load_weights(bad)
    assert e.value.code == f"generate.py: error: cannot read checkpoint {bad} (RuntimeError)"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(SystemExit) as e:
        STEPS[step]["generate"].load_weights(bad)
    assert e.value.code.startswith(f"generate.py: error: {bad} is not a checkpoint written by")


# --tensorboard ----------------------------------------------------------------------------------


def read_events(folder):
    """{tag: {step: value}} of the scalars in a folder of TensorBoard event files, as TensorBoard
    shows them (a step that appears twice is a failure: one value per step, as in metrics.csv)."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="pip install -r requirements-dev.txt",
    )
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: steps {steps}"
        scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
    return scalars


def read_metrics(path):
    """{column: {step: value}} of metrics.csv, the columns that have a value at a step."""
    table = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for column, value in row.items():
                if column != "step" and value:
                    table.setdefault(column, {})[int(row["step"])] = float(value)
    return table


def assert_same_scalars(events, metrics):
    assert set(events) == set(metrics)
    for tag, values in metrics.items():
        assert set(events[tag]) == set(values), tag
        for step, value in values.items():  # TensorBoard keeps float32
            assert events[tag][step] == pytest.approx(value, rel=1e-6, nan_ok=True), (tag, step)


@pytest.mark.parametrize("step", ["05", "06"])
def test_tensorboard_events_hold_the_scalars_of_metrics_csv(trained, step):
    out, _ = trained[step]
    metrics = read_metrics(out / "metrics.csv")
    assert set(metrics["train_loss"]) == set(range(1, 11))
    assert set(metrics["val_loss"]) == {0, 5, 10}
    assert_same_scalars(read_events(out / "tensorboard"), metrics)


def test_tensorboard_of_a_resumed_run_drops_what_came_after_its_checkpoint(tmp_path):
    """A resumed run redoes the steps after its checkpoint: metrics.csv keeps the rows up to it,
    and the events of the first run's later steps must give way to the new ones too."""
    R = STEPS["05"]["report"]
    args = SimpleNamespace(
        peak_flops=1e12, dtype="fp32", out_dir=tmp_path, preset="tiny", log_every=100,
        max_steps=8, tensorboard=True,
    )  # fmt: skip
    for start, steps, loss in [(0, range(1, 7), 1.0), (4, range(5, 9), 2.0)]:  # killed at 6
        log = R.TrainingLog(args, start, 100, 1e6, world_size=1, device=torch.device("cpu"))
        for s in steps:
            log.train_step(s, loss + s / 100, 1e-3, 0.5, 0.1, 0.01)
        log.close()
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert metrics["train_loss"] == pytest.approx(
        {s: (1 if s <= 4 else 2) + s / 100 for s in range(1, 9)}
    )
    assert_same_scalars(read_events(tmp_path / "tensorboard"), metrics)


@pytest.mark.parametrize("step", ["05", "06"])
def test_tensorboard_missing_is_one_line(step, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(SystemExit) as e:
        STEPS[step]["train"].parse_args(["--tensorboard", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    # argparse names the program as started: train.py from a shell, __main__.py under pytest
    assert err.splitlines()[-1].endswith(
        ": error: --tensorboard needs the tensorboard package: pip install tensorboard"
    )


# passes over the training data -----------------------------------------------------------------


@pytest.mark.parametrize("step", ["05", "06"])
def test_train_says_how_often_it_reads_its_data(trained, step):
    out, printed = trained[step]
    line = next(line for line in printed.splitlines() if line.startswith("data: "))
    name = "train.bin" if step == "05" else str(out.parent / "llama/train.pkl")
    n_tokens = int(line.rsplit("(", 1)[1].split()[0].replace(",", ""))
    assert 80_000 < n_tokens < 100_000  # 100 kB of bytes, less the validation split
    # 10 steps x 4 sequences x 64 tokens on one rank
    passes = 2560 / n_tokens
    assert (
        line
        == f"data: 10 steps x 256 tokens = {passes:.2f} passes over {name} ({n_tokens:,} tokens)"
    )
    assert "warning" not in printed


def test_many_passes_are_warned_about(capsys):
    R = STEPS["05"]["report"]
    R.print_data_passes("train.bin", 8_200_000, 8 * 16 * 4 * 1024, 5000)  # the old GPU example
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "data: 5,000 steps x 524,288 tokens = 319.69 passes over train.bin (8,200,000 tokens)"
    )
    assert out[1].startswith("warning: 320 passes over the same tokens: beyond about 4,")
    R.print_data_passes("train.bin", 8_200_000, 524_288, 62)  # 3.96 passes: no warning
    assert "warning" not in capsys.readouterr().out
