"""Edges of steps 01-04 that each test below was written to catch (a bug planted in the code made
it fail): the --data_dir recipe, saves that survive a lost node, the full-set validation loss and
accuracy and set_epoch in every script's own loop, snapshots that never cross from one step or
one dataset to another, one-line errors that leave the process group first, the GPU bound at
init_process_group on NCCL, threads shared out under mp.spawn, and step 03 refusing to run on
several machines."""

import os
import re
import runpy
import stat
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import free_port, load_script, run, script, start, stop, torchrun, worker_env

from datautils import synthetic_data

PY = sys.executable
STEP1, STEP2, STEP3, STEP4 = (
    "01_single_gpu.py",
    "02_multigpu_mp_spawn.py",
    "03_multigpu_torchrun.py",
    "04_multinode.py",
)
SNAPSHOT = {STEP3: "snapshot_03.pt", STEP4: "snapshot_04.pt"}


def single_worker(step, *args, cwd):
    """03 or 04 as one worker, with the variables torchrun would set, minus torchrun's start-up."""
    env = worker_env(LOCAL_RANK=0, RANK=0, WORLD_SIZE=1, LOCAL_WORLD_SIZE=1,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())  # fmt: skip
    return run([PY, script(step), *map(str, args)], cwd=cwd, env=env, timeout=60)


# --- the README's --data_dir recipe, verbatim -------------------------------------------------


def test_datautils_writes_my_data_and_step_01_trains_on_it_verbatim(tmp_path, monkeypatch, capsys):
    made = run([PY, script("datautils.py"), "my_data/"], cwd=tmp_path, check=True)
    assert made.stdout == "wrote X_train.npy, y_train.npy, X_val.npy, y_val.npy to my_data\n"
    # the numbers of the built-in synthetic data, so a step prints the same losses with them
    names = ("X_train", "y_train", "X_val", "y_val")
    for name, expected in zip(names, synthetic_data(seed=0), strict=True):
        assert np.array_equal(np.load(tmp_path / "my_data" / f"{name}.npy"), expected.numpy())
    # the README's command, word for word
    mine = run([PY, script(STEP1), "20", "5", "--data_dir", "my_data/"], cwd=tmp_path, check=True)
    lines = mine.stdout.splitlines()
    assert lines[0] == "task: regression, 20 features -> 1 float target(s), MSE loss"
    assert (
        len(lines) == 1 + 20 + 4 and lines[-1] == "epoch 19 | checkpoint saved at checkpoint_01.pt"
    )
    val = [float(x) for x in re.findall(r"val loss (\d+\.\d+)", mine.stdout)]
    assert val[-1] < 0.05 * val[0], mine.stdout
    # a second time it never overwrites the arrays (they could be someone's real data)
    before = (tmp_path / "my_data" / "X_train.npy").read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["datautils.py", "my_data/"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script("datautils.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "datautils.py: error: my_data/X_train.npy exists; remove it or choose another folder"
    )
    assert (tmp_path / "my_data" / "X_train.npy").read_bytes() == before


# --- saves survive a lost node: fsync the file, rename, fsync the folder --------------------


class Wrapped:
    """Stands in for DDP: save_snapshot reads .module."""

    def __init__(self, module):
        self.module = module


@pytest.mark.parametrize("step", [STEP1, STEP2, STEP3, STEP4])
def test_saves_fsync_the_file_before_the_rename_and_the_folder_after(step, tmp_path, monkeypatch):
    module = load_script(step)
    model = torch.nn.Linear(3, 1)
    path = str(tmp_path / "saved.pt")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "file"
        events.append(("fsync", kind, info.st_ino, info.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    if step in (STEP1, STEP2):
        module.save_checkpoint(model, path)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        done = 3 if step == STEP3 else [(epoch, 2) for epoch in range(3)]  # 04: (epoch, world)
        module.save_snapshot(Wrapped(model), optimizer, done, 2, "data id", path)
    saved = os.stat(path)
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
    (_, kind, ino, size), (_, moved, dst), (_, dir_kind, dir_ino, _) = events
    # the file fsynced is the one renamed to `path`, with all its bytes already written
    assert (kind, ino, size) == ("file", saved.st_ino, saved.st_size)
    assert (moved, dst) == (saved.st_ino, path)
    # then the folder that holds the new name
    assert (dir_kind, dir_ino) == ("folder", tmp_path.stat().st_ino)
    torch.load(path, weights_only=True)  # and the file is whole


# --- two ranks: the full-set validation loss, and set_epoch in each script's own loop ---------

# Records every DistributedSampler.set_epoch call of the process, one file per process. Loaded at
# start-up by every Python process of the run (mp.spawn's and torchrun's workers included).
RECORDER = """
import os
if os.environ.get("SET_EPOCH_LOG"):
    from torch.utils.data.distributed import DistributedSampler
    real_set_epoch = DistributedSampler.set_epoch
    def set_epoch(self, epoch):
        with open(os.path.join(os.environ["SET_EPOCH_LOG"], f"{os.getpid()}.txt"), "a") as f:
            f.write(f"{self.rank} {epoch}\\n")
        real_set_epoch(self, epoch)
    DistributedSampler.set_epoch = set_epoch
"""

EPOCHS = 3


def uneven_data(folder):
    """Regression data with 15 validation samples: shards of 8 and 7 on 2 ranks. Sample 0, the one
    a padding DistributedSampler would count twice, has a loss far above the others."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 1))
    X_train, X_val = rng.normal(size=(40, 3)), rng.normal(size=(15, 3))
    y_train = X_train @ w + 0.1 * rng.normal(size=(40, 1))
    y_val = X_val @ w + 0.1 * rng.normal(size=(15, 1))
    y_val[0] += 3.0
    folder.mkdir()
    arrays = {"X_train": X_train, "y_train": y_train, "X_val": X_val, "y_val": y_val}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array.astype(np.float32))
    return arrays


def two_workers(cmd, cwd, env):
    """03 or 04 as two workers, started with the variables torchrun sets, minus its agent."""
    world = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))  # fmt: skip
    workers = [start(cmd, cwd=cwd, env={**env, **world, "RANK": r, "LOCAL_RANK": r}) for r in "01"]
    try:
        outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    finally:
        for worker in workers:
            stop(worker)
    for worker, out in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, out
    return outputs[0]  # rank 0 reports


@pytest.fixture(scope="module", params=[STEP2, STEP3, STEP4])
def two_rank_run(request, tmp_path_factory):
    step = request.param
    folder = tmp_path_factory.mktemp(step[:2])
    arrays = uneven_data(folder / "data")
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(RECORDER)
    (folder / "log").mkdir()
    env = worker_env(SET_EPOCH_LOG=folder / "log")
    env["PYTHONPATH"] = f"{folder / 'site'}{os.pathsep}{env['PYTHONPATH']}"
    cmd = [PY, script(step), EPOCHS, EPOCHS, "--data_dir", folder / "data", "--batch_size", 4]
    if step == STEP2:  # mp.spawn starts 2 processes on a machine without GPUs
        stdout = run(cmd, cwd=folder, env=env, timeout=120, check=True).stdout
    else:
        stdout = two_workers(cmd, folder, env)
    saved = torch.load(folder / (SNAPSHOT.get(step) or "checkpoint_02.pt"), weights_only=True)
    calls = sorted(log.read_text() for log in (folder / "log").iterdir())
    return step, stdout, arrays, saved.get("model", saved), calls


def mse(weights, X, y):
    """Mean squared error of the linear model `weights` on (X, y), in float64."""
    W, b = weights["weight"].double(), weights["bias"].double()
    X, y = torch.from_numpy(X).float().double(), torch.from_numpy(y).float().double()
    return F.mse_loss(X @ W.T + b, y).item()


def test_two_ranks_print_exactly_the_full_set_val_loss(two_rank_run):
    step, stdout, arrays, weights, _ = two_rank_run
    printed = float(re.findall(r"val loss (\d+\.\d+)", stdout)[-1])  # after the last epoch
    X, y = arrays["X_val"], arrays["y_val"]
    full = mse(weights, X, y)
    # what the usual mistakes would print instead, all far from the full-set loss
    shard0 = mse(weights, X[0::2], y[0::2])  # rank 0's shard alone, no all-reduce
    padded = mse(weights, X[[*range(15), 0]], y[[*range(15), 0]])  # sample 0 counted twice
    mean_of_means = (shard0 + mse(weights, X[1::2], y[1::2])) / 2
    for wrong in (shard0, padded, mean_of_means):
        assert abs(wrong - full) > 0.01, (wrong, full)
    # exact to the printed digits (+1e-6 for float32 sums): every sample once, over 15
    assert abs(printed - full) <= 0.5e-4 + 1e-6, (step, printed, full, stdout)


def test_two_ranks_print_the_full_set_accuracy(tmp_path):
    """Classification on 2 ranks: 15 validation samples, shards of 8 and 7; the printed accuracy
    is the fraction right over all 15 (sums and counts all-reduced), as one process counts."""
    rng = np.random.default_rng(0)
    X_train, X_val = rng.normal(size=(40, 3)), rng.normal(size=(15, 3))
    arrays = {"X_train": X_train, "y_train": (X_train[:, 0] > 0).astype(np.int64),
              "X_val": X_val, "y_val": (X_val[:, 1] > 0).astype(np.int64)}  # fmt: skip
    (tmp_path / "data").mkdir()
    for name, array in arrays.items():
        np.save(tmp_path / "data" / f"{name}.npy", array.astype(array.dtype))
    cmd = [PY, script(STEP2), 2, 2, "--data_dir", tmp_path / "data", "--batch_size", 4]
    stdout = run(cmd, cwd=tmp_path, timeout=120, check=True).stdout
    weights = torch.load(tmp_path / "checkpoint_02.pt", weights_only=True)
    logits = torch.from_numpy(X_val).float() @ weights["weight"].T + weights["bias"]
    right = (logits.argmax(1).numpy() == arrays["y_val"]).sum()
    assert f"| val accuracy {right / 15:.1%}" in stdout.splitlines()[-2], (right, stdout)
    assert stdout.count("task: classification") == 1, stdout  # rank 0 alone says it


def test_each_rank_calls_set_epoch_with_every_epoch_in_order(two_rank_run):
    step, _, _, _, calls = two_rank_run
    # two processes (the two ranks), each calling set_epoch(0), (1), (2) on its own sampler
    expected = ["".join(f"{rank} {epoch}\n" for epoch in range(EPOCHS)) for rank in (0, 1)]
    assert calls == expected, (step, calls)


# --- snapshots never cross from one step to another ------------------------------------------


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """03 then 04 run in the same folder, as a reader following the README does."""
    folder = tmp_path_factory.mktemp("steps")
    out3 = single_worker(STEP3, 2, 1, cwd=folder)
    out4 = single_worker(STEP4, 2, 1, cwd=folder)
    return folder, out3, out4


def test_step_04_after_step_03_starts_fresh_in_its_own_file(snapshots):
    folder, out3, out4 = snapshots
    assert out3.returncode == out4.returncode == 0, out3.stderr + out4.stderr
    assert "Resuming" not in out4.stdout and "epoch 0 |" in out4.stdout, out4.stdout
    assert "epoch 1 | snapshot saved at snapshot_04.pt" in out4.stdout
    for step, name in SNAPSHOT.items():
        snapshot = torch.load(folder / name, weights_only=True)
        assert snapshot["written_by"] == step and snapshot["world_size"] == 1, name


def test_step_04_refuses_step_03s_snapshot_in_one_line(snapshots, tmp_path):
    foreign = tmp_path / "snapshot_03.pt"
    foreign.write_bytes((snapshots[0] / "snapshot_03.pt").read_bytes())
    result = single_worker(STEP4, 4, 1, "--snapshot_path", "snapshot_03.pt", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{STEP4}: error: snapshot_03.pt is a snapshot of {STEP3}, not of this step; "
        "move it away or pass another --snapshot_path"
    )
    assert "train loss" not in result.stdout
    assert foreign.read_bytes() == (snapshots[0] / "snapshot_03.pt").read_bytes()
    assert not (tmp_path / "snapshot_04.pt").exists()


def test_step_03_refuses_step_04s_snapshot(snapshots):
    step3 = load_script(STEP3)
    model = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    path = str(snapshots[0] / "snapshot_04.pt")
    with pytest.raises(SystemExit) as exit_info:
        step3.load_snapshot(path, model, optimizer, "cpu", data_id="any")
    assert exit_info.value.code == (
        f"{STEP3}: error: {path} is a snapshot of {STEP4}, not of this step; "
        "move it away or pass another --snapshot_path"
    )


@pytest.mark.parametrize("step", [STEP3, STEP4])
def test_a_snapshot_of_another_world_size_is_announced_and_resumed(step, snapshots, tmp_path):
    # e.g. an elastic 04 job that lost one of its machines for good goes on with fewer processes
    snapshot = torch.load(snapshots[0] / SNAPSHOT[step], weights_only=True)
    snapshot["world_size"] = 4
    torch.save(snapshot, tmp_path / SNAPSHOT[step])
    result = single_worker(step, 3, 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith(("rank ", "task"))]
    note = {  # 04 also says what it chose for the new world size (an elastic job's case)
        STEP3: f"Note: {SNAPSHOT[step]} was written by 4 processes, this run has 1: training "
        "goes on with a global batch of 1 x 32 samples",
        STEP4: "Note: world size 4 -> 1 at epoch 2: global batch 128 -> 32 (32 per process, no "
        "accumulation), lr 0.01 unchanged, each epoch's shuffle unchanged",
    }
    assert lines[:2] == [f"Resuming training from snapshot {SNAPSHOT[step]} at epoch 2", note[step]]
    assert lines[2].startswith("[cpu x 1] epoch 2 |"), result.stdout
    assert torch.load(tmp_path / SNAPSHOT[step], weights_only=True)["world_size"] == 1


# --- step 03 is for one machine ----------------------------------------------------------------


def test_step_03_on_two_machines_stops_every_worker_with_one_line(tmp_path):
    """2 nodes x 1 process: both workers have LOCAL_RANK 0. Without the check both trained as
    rank 0 (the same shard) and wrote the same snapshot."""
    cmd = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_id=t03",
                   f"--rdzv_endpoint=127.0.0.1:{free_port()}", script(STEP3), 3, 1)  # fmt: skip
    agents = [start(cmd, cwd=tmp_path) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=90)[0] for agent in agents]
    finally:
        for agent in agents:
            stop(agent)
    expected = (
        f"{STEP3}: error: this step runs on one machine, but torchrun started 1 of the 2 "
        "processes here: for several machines use step 04 (04_multinode.py)"
    )
    for agent, out in zip(agents, outputs, strict=True):
        assert agent.returncode != 0, out
        assert expected in out.splitlines(), out
        assert "train loss" not in out, out
    assert not list(tmp_path.glob("snapshot*"))


# --- a snapshot is of one dataset --------------------------------------------------------------


@pytest.mark.parametrize("step", [STEP3, STEP4])
def test_a_snapshot_of_other_data_with_the_same_shapes_is_refused(step, snapshots, tmp_path):
    # --seed 1 draws another synthetic task of the same shapes: the weights would fit, silently
    saved = (snapshots[0] / SNAPSHOT[step]).read_bytes()
    (tmp_path / SNAPSHOT[step]).write_bytes(saved)
    result = single_worker(step, 4, 1, "--seed", 1, cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"{step}: error: {SNAPSHOT[step]} was trained on other data \(fingerprint [0-9a-f]{{16}}, "
        r"this data [0-9a-f]{16}\); move it away or pass another --snapshot_path",
        line,
    ), line
    assert "train loss" not in result.stdout
    assert (tmp_path / SNAPSHOT[step]).read_bytes() == saved


@pytest.mark.parametrize("step", [STEP3, STEP4])
def test_a_one_line_error_leaves_the_process_group_first(step, snapshots, tmp_path):
    """The snapshot errors come after init_process_group: NCCL warns at exit about a group that
    was never destroyed, so the process leaves it before exiting."""
    module = load_script(step)
    (tmp_path / "bad.pt").write_bytes(b"not a snapshot")
    model = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        with pytest.raises(SystemExit) as exit_info:
            module.load_snapshot(str(tmp_path / "bad.pt"), model, optimizer, "cpu", "any")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "is not a readable snapshot of this model" in exit_info.value.code


# --- the CUDA path of init_process_group, by construction -------------------------------------


@pytest.mark.parametrize("step", [STEP2, STEP3, STEP4])
def test_setup_binds_the_gpu_on_nccl_and_gives_gloo_no_device(step, monkeypatch):
    """init_process_group(device_id=...) on NCCL: the communicator is created at once and
    barrier() uses that GPU. gloo is given none (a CPU device_id raises in torch 2.13)."""
    module = load_script(step)
    calls = []
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    ranks = (1, 2) if step == STEP2 else ()  # 02's setup takes rank and world size
    module.setup(*ranks, torch.device("cuda", 1))
    module.setup(*ranks, torch.device("cpu"))
    extra = {"rank": 1, "world_size": 2} if step == STEP2 else {}
    assert calls == [
        ("set", torch.device("cuda", 1)),
        (("nccl",), {**extra, "device_id": torch.device("cuda", 1)}),
        (("gloo",), {**extra, "device_id": None}),
    ]


# --- mp.spawn shares the cores out, as torchrun does -------------------------------------------


@pytest.mark.parametrize("preset, expected", [(None, "4"), ("3", "3")])
def test_step_02_gives_each_process_its_share_of_the_cores(preset, expected, monkeypatch):
    """8 cores, 2 processes: 4 threads each (OMP_NUM_THREADS, read by the spawned processes).
    A value the user set is kept."""
    for var in ("OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # and restored afterwards
    if preset:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    seen = []
    monkeypatch.setattr("torch.multiprocessing.spawn",
                        lambda *a, **kw: seen.append(os.environ["OMP_NUM_THREADS"]))  # fmt: skip
    monkeypatch.setattr("sys.argv", [STEP2, "1", "1", "--world_size", "2", "--device", "cpu"])
    runpy.run_path(script(STEP2), run_name="__main__")
    assert seen == [expected]


@pytest.mark.parametrize("step", [STEP2, STEP3, STEP4])
def test_on_windows_setup_asks_for_a_store_without_libuv(step, monkeypatch):
    """PyTorch's Windows builds have no libuv; env:// reads USE_LIBUV (docs/windows.md)."""
    module = load_script(step)
    seen = []
    monkeypatch.delenv("USE_LIBUV", raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(dist, "init_process_group",
                        lambda *a, **kw: seen.append(os.environ.get("USE_LIBUV")))  # fmt: skip
    module.setup(*((0, 1) if step == STEP2 else ()), torch.device("cpu"))
    assert seen == ["0"]
