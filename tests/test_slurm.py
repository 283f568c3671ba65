"""The slurm/ scripts on a real Slurm cluster (tests/slurm_cluster.py): multinode.sh on one node,
and multinode.sh, gpt.sh and llama.sh on two nodes that are separate hosts (network namespaces,
own hostnames and addresses). Each job must reach COMPLETED, and its per-job log must show a
torchrun on every node, every rank of the world (multinode.sh) and the training to its end.
Jobs that must fail, and fast: a head node whose name resolves to loopback on itself (the
script's error, at once), and a node that fails for good (the job ends FAILED, not after
torchrun's 10-minute join_timeout)."""

import os
import re
import shutil
from pathlib import Path

import netns_hosts
import pytest
from helpers import PYTHON, ROOT, run, worker_env
from slurm_cluster import SlurmCluster, skip_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TRAIN = ["4", "2", "--batch_size", "64", "--snapshot_path", "snapshot.pt"]
# a few steps of the tiny GPT / Llama: enough to evaluate, save and finish
TINY_LM = ["--max_steps", "6", "--eval_every", "3", "--eval_batches", "1", "--save_every", "3"]
TINY_LM += ["--sample_every", "0", "--batch_size", "4"]
JOB_NAME = {"multinode.sh": "ddp-multinode", "gpt.sh": "ddp-gpt", "llama.sh": "ddp-llama"}


@pytest.fixture(autouse=True)
def needs_slurm():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


def job_env(cluster, **extra):
    """The submitting user's environment: this venv's torchrun first on PATH, as after
    `source .venv/bin/activate`."""
    venv_bin = str(Path(PYTHON).parent)
    env = worker_env(**extra)
    env["PATH"] = venv_bin + os.pathsep + env["PATH"]
    return cluster.env(**env)


def submit_from(folder):
    """A folder to submit from, as the repository root would be (the job writes its log and
    snapshot there, not into the repository)."""
    shutil.copy(ROOT / "04_multinode.py", folder)  # datautils comes from PYTHONPATH=repo root
    return folder


def run_job(cluster, folder, sbatch_args, script="multinode.sh", args=TRAIN, nproc=2):
    """`sbatch [SBATCH_ARGS] slurm/SCRIPT ARGS...` with NPROC processes per node; returns the job
    log once the job reached COMPLETED."""
    env = job_env(cluster, NPROC_PER_NODE=nproc)
    job = cluster.sbatch([*sbatch_args, ROOT / "slurm" / script, *args], folder, env)
    state = cluster.wait(job, timeout=240)
    log = folder / f"{JOB_NAME[script]}-{job}.log"  # --output=%x-%j.log in the script
    text = log.read_text() if log.exists() else "(no job log)"
    assert state == "COMPLETED", f"job {job}: {state}\n{text}{cluster.daemon_logs()}"
    return text


def torchrun_hosts(log):
    """The hosts the scripts' launcher line says a torchrun started on, one entry per torchrun."""
    # the same interleaving as below: another node's line may follow without a newline
    return sorted(re.findall(r"torchrun on ([\w.-]+?)(?=torchrun on |\s)", log))


def rank_lines(log):
    # Processes on different nodes share the log, so one's newline may come after another's line.
    found = re.findall(r"rank (\d+) of (\d+) \(local rank (\d+)\) on ([\w.-]+?)(?=rank |\s)", log)
    return sorted(found)


def test_one_node(tmp_path):
    folder = submit_from(tmp_path)
    with SlurmCluster.single() as cluster:
        log = run_job(cluster, folder, ["--nodes=1"])  # overrides the script's --nodes=2
    node = cluster.nodes[0][0]
    assert torchrun_hosts(log) == [node], log
    assert rank_lines(log) == [("0", "2", "0", node), ("1", "2", "1", node)], log
    assert "rendezvous at 127.0.0.1:29500" in log  # one node: loopback is fine
    assert "[cpu x 2] epoch 3" in log and "snapshot saved at snapshot.pt" in log
    assert (folder / "snapshot.pt").exists()


@pytest.fixture(scope="module")
def two_nodes():
    """A controller host and two compute hosts, each in its own network namespace."""
    if skip_reason() or netns_hosts.skip_reason():
        pytest.skip(skip_reason() or netns_hosts.skip_reason())
    with netns_hosts.network(["ctl", "node1", "node2"]) as hosts:
        with SlurmCluster.in_namespaces(hosts, "ctl", ["node1", "node2"]) as cluster:
            yield cluster


@pytest.mark.multihost
def test_two_nodes_in_namespaces(tmp_path, two_nodes):
    folder = submit_from(tmp_path)
    log = run_job(two_nodes, folder, [])  # the script's own default: 2 nodes
    assert torchrun_hosts(log) == ["node1", "node2"], log
    # 4 ranks in one world, 2 per node; local ranks 0 and 1 on each node
    ranks = rank_lines(log)
    assert [r for r, *_ in ranks] == ["0", "1", "2", "3"], log
    assert {world for _, world, _, _ in ranks} == {"4"}
    assert sorted((node, local) for _, _, local, node in ranks) == [
        ("node1", "0"),
        ("node1", "1"),
        ("node2", "0"),
        ("node2", "1"),
    ]
    # the head node's own address, not a loopback one
    assert f"rendezvous at {two_nodes.hosts.addr['node1']}:29500" in log
    assert "[cpu x 4] epoch 3" in log


@pytest.mark.multihost
def test_gpt_script_on_two_nodes(tmp_path, two_nodes):
    prepare = [PYTHON, ROOT / "05_gpt_ddp" / "prepare.py", "--tokenizer", "char"]
    run([*prepare, "--data_dir", tmp_path / "data", "--max_bytes", "200000"], check=True)
    (tmp_path / "05_gpt_ddp").symlink_to(ROOT / "05_gpt_ddp")  # as in the repository root
    args = ["--preset", "tiny", "--data_dir", "data", "--out_dir", "out", *TINY_LM]
    log = run_job(two_nodes, tmp_path, [], "gpt.sh", args, nproc=1)
    # a world of 2 ranks, made of one torchrun (one rank) on each of the two hosts
    assert torchrun_hosts(log) == ["node1", "node2"], log
    assert "2 rank(s) on cpu" in log and "done: out/ckpt.pt" in log, log
    assert (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.multihost
def test_llama_script_on_two_nodes(tmp_path, two_nodes):
    make_data = [PYTHON, ROOT / "06_llama_ddp" / "make_toy_data.py", "--max_bytes", "200000"]
    run([*make_data, "--out_dir", tmp_path], check=True)
    (tmp_path / "06_llama_ddp").symlink_to(ROOT / "06_llama_ddp")
    args = ["--preset", "tiny", "--train_file", "train.pkl", "--valid_file", "val.pkl"]
    log = run_job(two_nodes, tmp_path, [], "llama.sh", [*args, "--out_dir", "out", *TINY_LM], 1)
    assert torchrun_hosts(log) == ["node1", "node2"], log
    assert "2 rank(s) on cpu" in log and "done: out/ckpt.pt" in log, log
    assert (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.multihost
def test_a_head_node_that_resolves_itself_to_loopback_is_refused(tmp_path, two_nodes):
    # The Debian default: node1's own /etc/hosts says "127.0.1.1 node1". Other nodes could not
    # reach a rendezvous there, so the script must stop at once with a clear error, not hang.
    hosts_file = Path("/etc/netns") / two_nodes.hosts.netns("node1") / "hosts"
    original = hosts_file.read_text()
    try:
        # rewritten in place: slurmd on node1 has this very file mounted as its /etc/hosts
        hosts_file.write_text(
            original.replace(f"{two_nodes.hosts.addr['node1']} node1", "127.0.1.1 node1")
        )
        env = job_env(two_nodes, NPROC_PER_NODE=1)
        job = two_nodes.sbatch(
            [ROOT / "slurm" / "multinode.sh", *TRAIN], submit_from(tmp_path), env
        )
        state = two_nodes.wait(job, timeout=120)
    finally:
        hosts_file.write_text(original)
    log = (tmp_path / f"ddp-multinode-{job}.log").read_text()
    assert state == "FAILED", log
    assert (
        "error: node1 resolves to 127.0.1.1 (loopback) on itself; fix its /etc/hosts, or set "
        "head_addr to its cluster address (see README, 'Multiple machines')"
    ) in log
    assert "rank 0 of" not in log  # no training process was started


@pytest.mark.multihost
@pytest.mark.parametrize("script", ["multinode.sh", "gpt.sh", "llama.sh"])
def test_a_node_that_fails_for_good_ends_the_job(tmp_path, two_nodes, script):
    # node2's torchrun cannot start (think: a node without the Python environment); node1's
    # torchrun is already waiting at the rendezvous for it. Only `srun --kill-on-bad-exit=1`
    # ends the job then; without it node1 would wait for torchrun's join_timeout (600 s).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = Path(PYTHON).parent / "torchrun"
    (bin_dir / "torchrun").write_text(
        "#!/bin/sh\n"
        'if [ "$(hostname)" = node2 ]; then echo "torchrun: broken on node2" >&2; exit 1; fi\n'
        f'exec "{real}" "$@"\n'
    )
    (bin_dir / "torchrun").chmod(0o755)
    env = job_env(two_nodes, NPROC_PER_NODE=1)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    # default arguments: no training process starts (the rendezvous never completes), no data
    job = two_nodes.sbatch([ROOT / "slurm" / script], tmp_path, env)
    try:
        state = two_nodes.wait(job, timeout=60)  # the bound: a few seconds here, 60 on a slow CI
    finally:
        two_nodes.client("scancel", job)  # frees the nodes for the next test if it still runs
    log = (tmp_path / f"{JOB_NAME[script]}-{job}.log").read_text()
    assert state == "FAILED", log
    # node2's task started and failed; its own stderr line can be lost when srun kills the step
    # (seen once under load), so the failure is recognised by either of srun's two traces
    assert "torchrun on node2" in log, log
    traces = ["torchrun: broken on node2", "node2: task 1: Exited with exit code 1"]
    assert any(trace in log for trace in traces), log
