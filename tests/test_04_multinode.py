"""Step 04 on several machines: two torchrun agents on loopback, then two real hosts (network
namespaces, each with its own address and hostname), a node failure with per-node snapshots, and
rendezvous problems that must fail fast instead of hanging.

Every multi-node run is compared with a one-node run of the same world size: same data shards,
the same gradients averaged, so the final weights must be equal, to the bit.
"""

import os
import re
import shutil
import signal
import socket
import subprocess

import netns_hosts
import pytest
import torch
from helpers import (
    PYTHON,
    ROOT,
    free_port,
    run,
    script,
    stop,
    torchrun,
    wait_for,
    worker_env,
    worker_pids,
)

# Small batches: enough steps per epoch that a node can be killed mid-training.
TRAIN = ["10", "2", "--batch_size", "8"]
WRITES = "snapshot saved"


def agent(endpoint, *extra, nnodes="2", nproc=1, train=TRAIN):
    """One machine's torchrun: the command a reader types on each node."""
    return torchrun(
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_id=test04",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        *extra,
        script("04_multinode.py"),
        *train,
    )


def start_logged(cmd, log, cwd):
    """Start in its own process group, output to a file (two agents never block on a full pipe)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            env=worker_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def run_agents(cmds, cwds, logs, timeout=150):
    """Run one agent per command at once; return their outputs after all have exited."""
    procs = [start_logged(cmd, log, cwd) for cmd, log, cwd in zip(cmds, logs, cwds, strict=True)]
    try:
        for proc in procs:
            proc.wait(timeout)
    except subprocess.TimeoutExpired:
        outputs = "\n".join(f"--- {log} ---\n{log.read_text()[-3000:]}" for log in logs)
        raise AssertionError(f"agents still running after {timeout}s\n{outputs}") from None
    finally:
        for proc in procs:
            stop(proc)
    return [(proc.returncode, log.read_text()) for proc, log in zip(procs, logs, strict=True)]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(path, reference):
    """Bitwise equal: with 2 ranks, averaging a and b gives the same bits in any order."""
    got = weights(path)
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def reference_snapshot(tmp_path_factory):
    """The final snapshot of an uninterrupted one-node run with world size 2."""
    folder = tmp_path_factory.mktemp("reference")
    cmd = torchrun("--standalone", "--nproc_per_node=2", script("04_multinode.py"), *TRAIN)
    result = run(cmd, cwd=folder, env=worker_env(), timeout=120, check=True)
    assert "rank 1 of 2 (local rank 1)" in result.stdout
    return folder / "snapshot_04.pt"


@pytest.fixture(scope="module")
def reference(reference_snapshot):
    return weights(reference_snapshot)


def readme_bash_blocks():
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"^```bash\n(.*?)\n```$", readme, re.M | re.S)


def test_readme_agents_sharing_a_machine_pick_a_free_port_and_share_the_cores():
    """Two agents of --nproc_per_node=1 on one machine: torchrun sets OMP_NUM_THREADS only when
    it starts several processes, so the command must; and a fixed port would let two runs at once
    join each other's rendezvous."""
    local = [b for b in readme_bash_blocks() if b.count("--rdzv_endpoint=127.0.0.1:") >= 2]
    assert len(local) >= 2, "the README's loopback commands of step 04 are gone"
    for block in local:
        assert not re.search(r"--rdzv_endpoint=127\.0\.0\.1:\d", block), block
        endpoint = block.index("--rdzv_endpoint")
        assert 0 <= block.find("export PORT=") < endpoint, block
        if "--nproc_per_node=1" in block:
            assert 0 <= block.find("export OMP_NUM_THREADS=") < endpoint, block


def test_without_torchrun_it_says_how_to_start():
    result = run([PYTHON, script("04_multinode.py"), *TRAIN], timeout=60, env=worker_env())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "04_multinode.py: error: start me with torchrun on every machine, e.g. torchrun "
        "--nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 "
        "04_multinode.py"
    )


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci installs it)")
def test_every_rank_writes_its_rank_line_in_one_piece(tmp_path):
    """All ranks print this line at the same moment, and torchrun runs them with `python -u`,
    where print() writes the text and its newline separately: two pieces per line, which can mix
    with another rank's on the reader's terminal (it did, in the README test). strace shows the
    write() system calls themselves: one per line, each ending in its newline."""
    trace = tmp_path / "writes.txt"
    strace = ["strace", "--seccomp-bpf", "-f", "-qq", "-s", "300", "-e", "trace=write", "-o", trace]
    cmd = strace + torchrun("--standalone", "--nproc_per_node=2", script("04_multinode.py"), 1, 1)
    run(cmd, cwd=tmp_path, env=worker_env(), timeout=120, check=True)
    pieces = re.findall(r'write\(1, "([^"]*local rank[^"]*)"', trace.read_text())
    host = socket.gethostname()
    assert sorted(pieces) == [f"rank {r} of 2 (local rank {r}) on {host}\\n" for r in (0, 1)]


@pytest.mark.slow
def test_two_agents_on_loopback_equal_one_node(tmp_path, reference):
    # Elastic size 1:2, as in the README; both agents start together, so both join round 0.
    cmd = agent(f"127.0.0.1:{free_port()}", nnodes="1:2")
    (rc0, out0), (rc1, out1) = run_agents(
        [cmd, cmd], [tmp_path, tmp_path], [tmp_path / "a.log", tmp_path / "b.log"]
    )
    assert rc0 == rc1 == 0, out0 + out1
    both = out0 + out1
    assert "rank 0 of 2 (local rank 0)" in both and "rank 1 of 2 (local rank 0)" in both
    # shared folder: global rank 0 alone writes the snapshot, and global rank 0 alone reports
    writer, other = (out0, out1) if "rank 0 of 2" in out0 else (out1, out0)
    assert WRITES in writer and WRITES not in other
    assert "train loss" in writer and "train loss" not in other
    assert_same_weights(tmp_path / "snapshot_04.pt", reference)


@pytest.mark.slow
def test_nodes_resuming_from_different_epochs_stop_with_a_clear_error(tmp_path, reference_snapshot):
    # Two machines with their own disks, run without --snapshot_per_node: only the machine that
    # was global rank 0 has a snapshot (of epoch 10), the other would start from epoch 0.
    disks = [tmp_path / "node_a", tmp_path / "node_b"]
    for disk in disks:
        disk.mkdir()
    shutil.copy(reference_snapshot, disks[0] / "snapshot_04.pt")
    cmd = agent(f"127.0.0.1:{free_port()}", train=["12", "2"])
    results = run_agents([cmd, cmd], disks, [tmp_path / "a.log", tmp_path / "b.log"])
    expected = (
        "04_multinode.py: error: machines resumed from different epochs (0 to 10): is "
        "--snapshot_path on a disk they all share? If each has its own, pass --snapshot_per_node"
    )
    for rc, out in results:
        assert rc != 0
        assert expected in out, out
        # one line from the script, no traceback through it (torchrun's own report follows)
        assert f'File "{script("04_multinode.py")}"' not in out, out
    # nothing was written: node_a's snapshot is untouched, node_b still has none
    assert torch.load(disks[0] / "snapshot_04.pt", weights_only=True)["epochs_run"] == 10
    assert not (disks[1] / "snapshot_04.pt").exists()


@pytest.mark.slow
def test_an_endpoint_nobody_answers_fails_within_the_read_timeout(tmp_path):
    # is_host=0: this agent must connect to someone else's store, and nobody listens there.
    port = free_port()
    cmd = agent(f"127.0.0.1:{port}", "--rdzv_conf=is_host=0,read_timeout=5")
    result = run(cmd, cwd=tmp_path, env=worker_env(), timeout=60)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"timed out after 5000ms while trying to connect to (127.0.0.1, {port})" in out
    assert "RendezvousConnectionError: The connection to the C10d store has failed" in out


@pytest.mark.slow
def test_a_node_that_never_comes_fails_within_the_join_timeout(tmp_path):
    cmd = agent(f"127.0.0.1:{free_port()}", "--rdzv_conf=join_timeout=5")
    result = run(cmd, cwd=tmp_path, env=worker_env(), timeout=60)
    assert result.returncode != 0
    assert "RendezvousTimeoutError" in result.stdout + result.stderr


# --- two real hosts: network namespaces node1 and node2 --------------------------------------


@pytest.fixture(scope="module")
def hosts():
    reason = netns_hosts.skip_reason()
    if reason:
        pytest.skip(reason)
    with netns_hosts.network(["node1", "node2"]) as made:
        yield made


@pytest.mark.slow
@pytest.mark.multihost
def test_two_hosts_agree_on_the_world_and_equal_one_node(tmp_path, hosts, reference):
    # The plain command of the README on each host: the endpoint is a host name, resolved by each
    # host's own /etc/hosts to node1's address (no 127.0.0.1 anywhere).
    cmds = [hosts.run_cmd(name, agent("node1:29500")) for name in hosts.names]
    logs = [tmp_path / f"{name}.log" for name in hosts.names]
    (rc1, out1), (rc2, out2) = run_agents(cmds, [tmp_path, tmp_path], logs)
    assert rc1 == rc2 == 0, out1 + out2
    # Each host runs one process, knows itself by its own hostname, and the two ranks are 0 and 1
    # of one world of 2 (which host gets rank 0 is up to the rendezvous).
    ranks = []
    for host, out in zip(hosts.names, (out1, out2), strict=True):
        found = re.findall(r"^rank (\d+) of (\d+) \(local rank 0\) on (\S+)$", out, re.M)
        assert [(world, name) for _, world, name in found] == [("2", host)], out
        ranks.append(found[0][0])
    assert sorted(ranks) == ["0", "1"]
    assert_same_weights(tmp_path / "snapshot_04.pt", reference)


@pytest.mark.slow
@pytest.mark.multihost
def test_a_killed_node_recovers_from_its_own_snapshot(tmp_path, hosts, reference):
    # No shared disk: each host runs in its own folder, the same relative --snapshot_path.
    disks = [tmp_path / name for name in hosts.names]
    for disk in disks:
        disk.mkdir()
    train = [*TRAIN, "--snapshot_per_node"]
    cmds = [
        hosts.run_cmd(n, agent("node1:29500", "--max-restarts=1", train=train)) for n in hosts.names
    ]
    logs = [tmp_path / f"{name}.log" for name in hosts.names]
    procs = [start_logged(cmd, log, disk) for cmd, log, disk in zip(cmds, logs, disks, strict=True)]
    try:

        def snapshot_epoch():
            path = disks[1] / "snapshot_04.pt"
            return path.exists() and torch.load(path, weights_only=True)["epochs_run"] >= 4

        wait_for(snapshot_epoch, 120, "node2's snapshot of epoch 4")
        victims = wait_for(lambda: worker_pids(procs[1].pid), 10, "node2's worker")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        for proc in procs:
            proc.wait(150)  # a hang raises here; `finally` stops both agents
    finally:
        for proc in procs:
            stop(proc)
    outs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    # each host read its own snapshot, both of the same epoch, at least the one seen above
    resumed = [
        re.findall(r"Resuming training from snapshot snapshot_04.pt at epoch (\d+)", out)
        for out in outs
    ]
    assert len(resumed[0]) == len(resumed[1]) == 1, outs
    assert resumed[0] == resumed[1] and int(resumed[0][0]) >= 4
    for disk in disks:
        assert_same_weights(disk / "snapshot_04.pt", reference)
