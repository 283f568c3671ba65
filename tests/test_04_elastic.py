"""Step 04, elastic: a machine leaves and comes back.

Two hosts (network namespaces node1 and node2, tests/netns_hosts.py), each running the same
`torchrun --nnodes=1:2 --nproc_per_node=2 ... 04_multinode.py` on a shared folder: a world of 4.
Once a few epochs are saved, every process on node2 is SIGKILLed (the machine is gone); node1
must go on alone, a world of 2, from the last snapshot. Then node2 starts again, and the job must
grow back to 4 and finish.

What the run really did is read from two independent records and checked against each other:
the log (the one-line note the script prints when the world size changes) and the `history` the
snapshot keeps, one (epoch, world size) per epoch done. Every epoch must be there exactly once,
and the final weights must equal, bit for bit, a reference that follows the same schedule with
plain one-machine runs (`--standalone`, restarted at the same epochs with the same world sizes).
"""

import re
import subprocess
import time

import netns_hosts
import pytest
import torch
from helpers import run, script, stop, torchrun, wait_for, worker_env
from test_04_multinode import assert_same_weights, start_logged, weights

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

EPOCHS = 30
TRAIN = [str(EPOCHS), "1", "--batch_size", "16"]  # a snapshot after every epoch
# Faster than torchrun's defaults, to keep the test short: a node that stopped sending heartbeats
# is dropped after keep_alive_interval x keep_alive_max_attempt (default 5 s x 3), and a
# rendezvous that has its minimum of nodes waits last_call_timeout (default 30 s) for more.
RDZV_CONF = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"
NOTE = re.compile(r"^Note: world size (\d+) -> (\d+) at epoch (\d+): ", re.M)


def agent():
    return torchrun(
        "--nnodes=1:2",
        "--nproc_per_node=2",
        "--rdzv_id=elastic",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node1:29500",
        f"--rdzv_conf={RDZV_CONF}",
        "--max-restarts=3",
        script("04_multinode.py"),
        *TRAIN,
    )


def saved_history(path):
    try:
        return torch.load(path, weights_only=True)["history"]
    except (FileNotFoundError, RuntimeError, EOFError):  # not written yet, or being replaced
        return []


def regrown(logs):
    """All 4 ranks of a world of 4 started again, after node1 had gone on alone."""
    after = logs["node1"].read_text().split("rank 0 of 2 ", 1)[1] + logs["node2-again"].read_text()
    return len(re.findall(r"^rank \d of 4 ", after, re.M)) == 4


def leave_and_come_back(hosts, folder):
    """Run the scenario; returns the logs and the measured detection and regrowth times."""
    logs = {name: folder / f"{name}.log" for name in ("node1", "node2", "node2-again")}
    node1 = start_logged(hosts.run_cmd("node1", agent()), logs["node1"], folder)
    node2 = start_logged(hosts.run_cmd("node2", agent()), logs["node2"], folder)
    procs = [node1, node2]
    try:
        wait_for(lambda: len(saved_history(folder / "snapshot_04.pt")) >= 2, 120, "epoch 2 saved")
        killed_at = time.monotonic()
        assert hosts.kill_everything_on("node2"), "nothing ran on node2"
        node2.wait(10)
        wait_for(lambda: "rank 0 of 2 " in logs["node1"].read_text(), 120, "a world of 2")
        detection = time.monotonic() - killed_at
        # wait for training at world size 2, so that the regrowth has something to interrupt
        wait_for(lambda: "[cpu x 2] epoch" in logs["node1"].read_text(), 60, "an epoch at 2")
        started_at = time.monotonic()
        procs.append(start_logged(hosts.run_cmd("node2", agent()), logs["node2-again"], folder))
        wait_for(lambda: regrown(logs), 120, "a world of 4 again")
        regrowth = time.monotonic() - started_at
        for proc in (procs[0], procs[2]):
            proc.wait(180)  # a hang raises here; `finally` stops every agent
    except (AssertionError, subprocess.TimeoutExpired) as e:
        tails = "".join(f"\n--- {log.name} ---\n{log.read_text()[-3000:]}" for log in logs.values())
        raise AssertionError(f"{e}{tails}") from None
    finally:
        for proc in procs:
            stop(proc)
    outs = {name: log.read_text() for name, log in logs.items()}
    assert node1.returncode == procs[2].returncode == 0, "\n".join(outs.values())
    return outs, detection, regrowth


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    reason = netns_hosts.skip_reason()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("elastic")
    with netns_hosts.network(["node1", "node2"]) as hosts:
        outs, detection, regrowth = leave_and_come_back(hosts, folder)
    # nothing is left: no namespace of this test, so no process in one
    listed = netns_hosts.sh("ip", "netns", "list").stdout
    assert netns_hosts.own_prefix() not in listed
    print(f"\nnode2 lost -> 2 ranks training: {detection:.1f} s; node2 back -> 4: {regrowth:.1f} s")
    return folder, outs, saved_history(folder / "snapshot_04.pt")


def changes(history):
    """(old world size, new world size, epoch) wherever consecutive epochs differ."""
    pairs = zip(history, history[1:], strict=False)
    return [(a[1], b[1], b[0]) for a, b in pairs if a[1] != b[1]]


def test_every_epoch_was_trained_exactly_once(elastic):
    _, _, history = elastic
    assert [epoch for epoch, _ in history] == list(range(EPOCHS))


def test_the_world_shrank_to_node1_and_grew_back(elastic):
    _, outs, history = elastic
    # the history: 4 ranks, then 2 (node1 alone), then 4 again
    (first, shrink, _), (_, grow, _) = changes(history)
    assert history[0][1] == 4 and (shrink, grow) == (2, 4), history
    # the log says the same, at the same epochs: one note per change, from global rank 0
    notes = [
        tuple(map(int, found))
        for name in ("node1", "node2-again")
        for found in NOTE.findall(outs[name])
    ]
    assert sorted(notes, key=lambda n: n[2]) == changes(history), outs
    # and every epoch of the history was reported, with its world size, by that world's rank 0
    for epoch, world in history:
        assert f"[cpu x {world}] epoch {epoch} |" in "".join(outs.values()), (epoch, world)


def test_the_final_snapshot_equals_runs_that_follow_the_same_schedule(elastic, tmp_path):
    folder, _, history = elastic
    # one --standalone run per stretch of equal world size, each ending where the next begins
    for world, _, epoch in [*changes(history), (history[-1][1], None, EPOCHS)]:
        train = [str(epoch), *TRAIN[1:]]
        cmd = torchrun("--standalone", f"--nproc_per_node={world}", script("04_multinode.py"))
        run([*cmd, *train], cwd=tmp_path, env=worker_env(), timeout=180, check=True)
    assert saved_history(tmp_path / "snapshot_04.pt") == history
    assert_same_weights(folder / "snapshot_04.pt", weights(tmp_path / "snapshot_04.pt"))
