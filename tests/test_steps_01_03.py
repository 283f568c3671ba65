"""Steps 01-03 as a reader runs them: training works, DDP matches one process, sharding is right,
snapshots survive crashes, and bad input gets one clear line."""

import os
import re
import signal
import sys

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    free_port,
    load_script,
    run,
    script,
    start,
    stop,
    torchrun,
    wait_for,
    worker_env,
    worker_pids,
)

from datautils import load_datasets, make_model

PY = sys.executable
STEP1, STEP2, STEP3 = "01_single_gpu.py", "02_multigpu_mp_spawn.py", "03_multigpu_torchrun.py"
# Each step writes its own file, so no step ever resumes another's state.
OUTPUT = {STEP1: "checkpoint_01.pt", STEP2: "checkpoint_02.pt", STEP3: "snapshot_03.pt"}


def losses(output, kind):
    return [float(x) for x in re.findall(rf"{kind} loss (\d+\.\d+)", output)]


def step3_single_process(*args, cwd):
    """03 as one worker, started the way torchrun would start it (env vars), minus torchrun's
    start-up cost: fine for tests of argument, data and snapshot handling."""
    env = worker_env(LOCAL_RANK=0, RANK=0, WORLD_SIZE=1, LOCAL_WORLD_SIZE=1,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())  # fmt: skip
    return run([PY, script(STEP3), *map(str, args)], cwd=cwd, env=env, timeout=60)


def assert_same_params(a, b, exact):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# --- 1. every script runs with its README command, saves, and learns -----------------------

README_COMMANDS = {
    STEP1: [PY, script(STEP1), 6, 3],
    STEP2: [PY, script(STEP2), 6, 3],
    STEP3: torchrun("--standalone", "--nproc_per_node=2", script(STEP3), 6, 3),
}


@pytest.mark.parametrize("name", README_COMMANDS)
def test_readme_command_trains_and_saves(name, tmp_path):
    result = run(README_COMMANDS[name], cwd=tmp_path, timeout=120, check=True)
    train, val = losses(result.stdout, "train"), losses(result.stdout, "val")
    assert len(train) == len(val) == 6, result.stdout  # one line per epoch, from rank 0 only
    assert train[-1] < 0.5 * train[0] and val[-1] < 0.5 * val[0], result.stdout
    saved = tmp_path / OUTPUT[name]
    state = torch.load(saved, weights_only=True)
    weights = state["model"] if name == STEP3 else state
    assert set(weights) == {"weight", "bias"}  # plain keys: no "module." prefix from DDP
    assert not list(tmp_path.glob("*.tmp"))


def test_every_script_has_help():
    for name in (STEP1, STEP2, STEP3):
        result = run([PY, script(name), "--help"], timeout=60, check=True)
        for flag in ("total_epochs", "save_every", "--batch_size", "--device", "--seed"):
            assert flag in result.stdout, (name, flag)


# --- 2. DDP equivalence: 2 ranks x batch B == 1 process x batch 2B ---------------------------


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    (tmp_path / "ddp").mkdir(), (tmp_path / "single").mkdir()
    run([PY, script(STEP2), 3, 3, "--world_size", 2, "--batch_size", 16], cwd=tmp_path / "ddp",
        check=True)  # fmt: skip
    run([PY, script(STEP2), 3, 3, "--world_size", 1, "--batch_size", 32], cwd=tmp_path / "single",
        check=True)  # fmt: skip
    ddp = torch.load(tmp_path / "ddp/checkpoint_02.pt", weights_only=True)
    single = torch.load(tmp_path / "single/checkpoint_02.pt", weights_only=True)
    # 3 epochs x 64 steps: the gradients DDP averaged equal the big batch's, up to float rounding.
    assert_same_params(ddp, single, exact=False)
    # training moved the weights far from where they started, so the comparison means something
    initial, _ = make_model(load_datasets(None, seed=0)[0], seed=0)
    assert (ddp["weight"] - initial.weight).abs().max() > 1.0


@pytest.mark.slow
def test_torchrun_step_matches_mp_spawn_step(tmp_path):
    """03 only changes how processes start: same seed, same world size, same weights."""
    run([PY, script(STEP2), 2, 2], cwd=tmp_path, check=True)
    run(torchrun("--standalone", "--nproc_per_node=2", script(STEP3), 2, 2), cwd=tmp_path,
        check=True)  # fmt: skip
    spawned = torch.load(tmp_path / "checkpoint_02.pt", weights_only=True)
    launched = torch.load(tmp_path / "snapshot_03.pt", weights_only=True)["model"]
    assert_same_params(spawned, launched, exact=True)


def listening_ports():
    """TCP ports some process on this machine listens on, read from /proc (IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # state LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.slow
def test_spawn_runs_at_once_pick_their_own_ports_or_use_master_port(tmp_path):
    """Two 02 runs started together on one machine must not collide on rank 0's port, and a
    MASTER_PORT set by the user is the port rank 0 listens on."""
    port = free_port()
    runs = []
    for name, env in (
        ("a", worker_env()),
        ("b", worker_env()),
        ("c", worker_env(MASTER_PORT=port)),
    ):
        (tmp_path / name).mkdir()
        epochs = 20 if name == "c" else 4  # c runs long enough to be seen listening
        runs.append(start([PY, script(STEP2), epochs, epochs], cwd=tmp_path / name, env=env))
    try:
        wait_for(lambda: port in listening_ports(), 60, f"a listener on MASTER_PORT={port}")
        for proc in runs:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out
            assert "epoch 3 |" in out, out
    finally:
        for proc in runs:
            stop(proc)


# --- 3. sharding -----------------------------------------------------------------------------


class Indices(torch.utils.data.Dataset):
    """A dataset whose samples are their own indices, to see who gets what."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def shards(module, n, world_size, epoch, batch_size=4):
    per_rank_train, per_rank_val = [], []
    for rank in range(world_size):
        train, val = module.make_loaders(Indices(n), Indices(n), batch_size, rank, world_size, 0)
        train.sampler.set_epoch(epoch)
        per_rank_train.append(torch.cat(list(train)).tolist())
        per_rank_val.append(torch.cat(list(val)).tolist())
    return per_rank_train, per_rank_val


@pytest.mark.parametrize("step", [STEP2, STEP3])
def test_ranks_get_disjoint_shards_that_cover_the_data(step):
    module = load_script(step)
    train, val = shards(module, n=48, world_size=3, epoch=0)
    flat = sum(train, [])
    assert len(flat) == len(set(flat)) == 48 and set(flat) == set(range(48))
    assert sorted(sum(val, [])) == list(range(48))
    assert {len(t) for t in train} == {16}
    # reshuffled between epochs, still a partition
    train_next, _ = shards(module, n=48, world_size=3, epoch=1)
    assert train_next != train
    assert sorted(sum(train_next, [])) == list(range(48))


@pytest.mark.parametrize("step", [STEP2, STEP3])
def test_uneven_data_pads_training_but_not_validation(step):
    """50 samples on 4 ranks: training pads to 52 by repeating 2 samples, so every rank runs the
    same number of steps; validation counts each of the 50 samples exactly once."""
    train, val = shards(load_script(step), n=50, world_size=4, epoch=0)
    flat = sum(train, [])
    assert {len(t) for t in train} == {13} and len(flat) == 52
    assert set(flat) == set(range(50))
    assert sorted(sum(val, [])) == list(range(50))


# --- 4. fault tolerance: SIGKILL a worker, torchrun restarts, the result is unchanged -------


@pytest.mark.slow
def test_killed_worker_resumes_from_snapshot_with_identical_result(tmp_path):
    args = [script(STEP3), 12, 1, "--batch_size", 4]
    (tmp_path / "clean").mkdir(), (tmp_path / "killed").mkdir()
    run(torchrun("--standalone", "--nproc_per_node=2", *args), cwd=tmp_path / "clean", check=True)

    snapshot = tmp_path / "killed" / "snapshot_03.pt"
    agent = start(torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1", *args),
                  cwd=tmp_path / "killed")  # fmt: skip
    try:
        wait_for(snapshot.exists, timeout=90, what="the first snapshot")
        victim = wait_for(lambda: worker_pids(agent.pid), timeout=10, what="a worker")[-1]
        os.kill(victim, signal.SIGKILL)
        output, _ = agent.communicate(timeout=150)
    finally:
        stop(agent)
    assert agent.returncode == 0, output[-3000:]
    resumed = re.findall(r"Resuming training from snapshot \S+ at epoch (\d+)", output)
    assert resumed and 1 <= int(resumed[0]) < 12, output[-3000:]
    assert "epoch 11 | snapshot saved" in output
    clean = torch.load(tmp_path / "clean/snapshot_03.pt", weights_only=True)
    killed = torch.load(snapshot, weights_only=True)
    assert killed["epochs_run"] == clean["epochs_run"] == 12
    assert_same_params(clean["model"], killed["model"], exact=True)
    assert_same_params(clean["optimizer"]["state"][0], killed["optimizer"]["state"][0], exact=True)


def test_resume_does_not_repeat_the_finished_epoch(tmp_path):
    step3_single_process(3, 3, cwd=tmp_path)
    result = step3_single_process(5, 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Resuming training from snapshot snapshot_03.pt at epoch 3" in result.stdout
    assert re.findall(r"epoch (\d+) \|", result.stdout)[:2] == ["3", "3"]  # loss line, save line
    assert "epoch 2 " not in result.stdout
    assert "Note:" not in result.stdout  # same world size: nothing to announce


# --- 5. snapshots interrupted mid-write, corrupt or foreign ---------------------------------

KILL_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from helpers import load_script
step3 = load_script("03_multigpu_torchrun.py")
model = torch.nn.Linear(20, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
class Wrapped:  # stands in for DDP: save_snapshot reads .module
    module = model
real_save = torch.save
def dying_save(obj, f):
    real_save(obj, f)
    f.flush()
    f.truncate(f.tell() // 2)  # half of the bytes reached the disk, then the power went out
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
torch.nn.init.constant_(model.weight, 7.0)
step3.save_snapshot(Wrapped, opt, 5, 1, "data id", "snapshot_03.pt")
"""


@pytest.mark.slow
def test_snapshot_killed_mid_write_leaves_the_old_one_intact(tmp_path):
    step3_single_process(2, 2, cwd=tmp_path)
    before = (tmp_path / "snapshot_03.pt").read_bytes()
    code = KILL_DURING_SAVE.format(root=str(ROOT / "tests"))
    result = run([PY, "-c", code], cwd=tmp_path, env=worker_env(), timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "snapshot_03.pt").read_bytes() == before
    # the half-written temp file is never read, and the run resumes from the intact snapshot
    result = step3_single_process(3, 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Resuming training from snapshot snapshot_03.pt at epoch 2" in result.stdout


def truncated(path):
    path.write_bytes(path.read_bytes()[:300])


def foreign(path):
    torch.save({"something": torch.zeros(3)}, path)


def not_torch(path):
    path.write_text("hello, I am a text file\n")


def other_model(path):
    snapshot = torch.load(path, weights_only=True)
    snapshot["model"]["weight"] = torch.zeros(3, 20)
    torch.save(snapshot, path)


@pytest.mark.slow
@pytest.mark.parametrize("spoil", [truncated, foreign, not_torch, other_model])
def test_unreadable_snapshot_is_a_clear_error_and_is_kept(spoil, tmp_path):
    step3_single_process(1, 1, cwd=tmp_path)
    spoil(tmp_path / "snapshot_03.pt")
    before = (tmp_path / "snapshot_03.pt").read_bytes()
    result = step3_single_process(3, 1, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"{STEP3}: error: snapshot_03.pt is not a readable snapshot of this model \(\w+\); "
        r"move it away or pass another --snapshot_path",
        line,
    )
    assert (tmp_path / "snapshot_03.pt").read_bytes() == before


# --- 6. bad input ----------------------------------------------------------------------------


def write_npy(folder, **arrays):
    folder.mkdir(exist_ok=True)
    good = {
        "X_train": np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32),
        "y_train": np.arange(64) % 3,
        "X_val": np.random.default_rng(1).normal(size=(16, 5)).astype(np.float32),
        "y_val": np.arange(16) % 3,
    }
    good.update(arrays)
    for name, value in good.items():
        if value is not None:
            np.save(folder / f"{name}.npy", value)
    return folder


X_BAD_NAN = np.full((64, 5), np.nan, dtype=np.float32)
BAD_DATA = {
    "missing_dir": (None, "--data_dir {d}: no such directory"),
    "missing_file": ({"y_val": None}, "{d}/y_val.npy: file not found"),
    "length_mismatch": ({"y_train": np.arange(63) % 3}, "y_train.npy must have one row per sample"),
    "X_not_2d": ({"X_train": np.zeros(64, np.float32)}, "X_train.npy must be 2-D"),
    "non_finite": ({"X_train": X_BAD_NAN}, "X_train.npy must hold finite numbers"),
    "features_differ": ({"X_val": np.zeros((16, 4), np.float32)}, "different numbers of features"),
    "object_array": ({"y_val": np.array([{}] * 16)}, "y_val.npy: not a plain numeric .npy array"),
    # one-hot or several integer columns: once crashed with "Size mismatch between tensors"
    "int_labels_2d": (
        {"y_train": np.eye(3, dtype=np.int64)[np.arange(64) % 3]},
        "y_train.npy: integer labels must be one class index per sample, shape (64,) or (64, 1), "
        "got (64, 3)",
    ),
    # a class the model never trains on: it once silently added an output and changed the loss
    "class_only_in_val": (
        {"y_val": np.arange(16) % 5},
        "y_val.npy has class(es) 3, 4 that y_train.npy never has",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_gets_one_clear_line(case, tmp_path):
    arrays, message = BAD_DATA[case]
    data = tmp_path / "data"
    if arrays is not None:
        write_npy(data, **arrays)
    result = run([PY, script(STEP1), 2, 1, "--data_dir", data], cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{STEP1}: error: ") and message.format(d=data) in line
    assert not (tmp_path / "checkpoint_01.pt").exists()


def accuracy(weights, folder):
    """The accuracy of the linear model `weights` on folder's validation set, in percent."""
    X, y = np.load(folder / "X_val.npy"), np.load(folder / "y_val.npy")
    logits = torch.from_numpy(X) @ weights["weight"].T + weights["bias"]
    return 100 * (logits.argmax(1).numpy() == y).mean()


def test_npy_classification_and_regression_say_their_task_once(tmp_path):
    cls = write_npy(tmp_path / "cls", y_val=(np.arange(16) * 7) % 3)
    result = run([PY, script(STEP1), 3, 3, "--data_dir", cls], cwd=tmp_path, check=True)
    weights = torch.load(tmp_path / "checkpoint_01.pt", weights_only=True)
    assert weights["weight"].shape == (3, 5)
    task = (
        "task: classification, 5 features -> 3 classes (integer labels 0 to 2), cross-entropy loss"
    )
    assert [line for line in result.stdout.splitlines() if "task" in line] == [task]
    printed = [float(a) for a in re.findall(r"\| val accuracy (\d+\.\d)%$", result.stdout, re.M)]
    assert len(printed) == 3 and abs(printed[-1] - accuracy(weights, cls)) <= 0.05 + 1e-9

    reg = write_npy(tmp_path / "reg", y_train=np.ones((64, 2)), y_val=np.ones((16, 2)))
    result = run([PY, script(STEP1), 3, 3, "--data_dir", reg], cwd=tmp_path, check=True)
    assert torch.load(tmp_path / "checkpoint_01.pt", weights_only=True)["weight"].shape == (2, 5)
    assert len(losses(result.stdout, "val")) == 3 and "accuracy" not in result.stdout
    assert (
        result.stdout.splitlines()[0]
        == "task: regression, 5 features -> 2 float target(s), MSE loss"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["5", "1", "--batch_size", "0"],
            "argument --batch_size: must be a positive integer, got 0",
        ),
        (["5", "0"], "argument save_every: must be a positive integer, got 0"),
        (["0", "1"], "argument total_epochs: must be a positive integer, got 0"),
        (["5", "1", "--device", "cuda"], "--device cuda, but PyTorch sees no CUDA GPU"),
    ],
)
@pytest.mark.parametrize("step", [STEP1, STEP2])
def test_bad_arguments(step, args, message, tmp_path):
    result = run([PY, script(step), *args], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"{step}: error: {message}"
    assert "Traceback" not in result.stderr


def test_step2_bad_data_stops_before_spawning(tmp_path):
    result = run([PY, script(STEP2), 2, 1, "--data_dir", tmp_path / "nope"], cwd=tmp_path)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"{STEP2}: error: --data_dir {tmp_path / 'nope'}: no such directory"
    )


def test_step2_world_size_larger_than_gpu_count(monkeypatch, capsys):
    step2 = load_script(STEP2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("sys.argv", [STEP2, "5", "1", "--world_size", "4"])
    with pytest.raises(SystemExit) as exit_info:
        step2.parse_args()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"{STEP2}: error: --world_size 4, but only 2 GPU(s) are visible"
    )


def test_step3_bad_data_under_torchrun_keeps_the_snapshot(tmp_path):
    step3_single_process(1, 1, cwd=tmp_path)
    before = (tmp_path / "snapshot_03.pt").read_bytes()
    result = run(torchrun("--standalone", "--nproc_per_node=2", script(STEP3), 3, 1,
                          "--data_dir", tmp_path / "nope"), cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    line = f"{STEP3}: error: --data_dir {tmp_path / 'nope'}: no such directory"
    assert line in result.stderr.splitlines()  # each rank prints it; torchrun adds its report
    assert (tmp_path / "snapshot_03.pt").read_bytes() == before


def test_commands_in_the_docs_kill_by_pid_never_by_name():
    """`pkill -f NAME` kills the newest match of anyone on the machine: on a shared machine,
    someone else's run. The README's try-it kills a worker of its own torchrun, by pid."""
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    by_name = [f"{doc.name}: {line}" for doc in docs for line in doc.read_text().splitlines()
               if re.search(r"\b(pkill|killall)\b", line)]  # fmt: skip
    assert not by_name, by_name
    readme = (ROOT / "README.md").read_text()
    assert "kill -9 $(pgrep -P $! | head -n 1)" in readme


def test_step3_without_torchrun_says_how_to_start_it(tmp_path):
    env = worker_env()
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(var, None)
    result = run([PY, script(STEP3), 2, 1], cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"{STEP3}: error: start me with torchrun, e.g. torchrun --standalone "
        f"--nproc_per_node=2 {STEP3}"
    )
