"""The slurm/ scripts on a real Slurm cluster (tests/slurm_cluster.py): multinode.sh on one node,
and multinode.sh, gpt.sh, llama.sh and fsdp.sh on two nodes that are separate hosts (network
namespaces, own hostnames and addresses). Each job must reach COMPLETED, and its per-job log must
show a torchrun on every node, every rank of the world (multinode.sh) and the training to its
end; fsdp.sh's checkpoint must hold one shard per rank of both nodes.
Jobs that must fail, and fast: a head node whose name resolves to loopback on itself (the
script's error, at once), and a node that fails for good (the job ends FAILED, not after
torchrun's 10-minute join_timeout).
GPUs: the scripts ask for 8 per node and train with --device cuda; the CPU runs here opt in with
`sbatch --gpus-per-node=0`. The two nodes have 8 stand-in GPUs each (slurm_cluster.py), so a GPU
job really starts and must stop in one line per node: this CPU-only PyTorch sees none of them.
Every worker's MASTER_ADDR must be the address the script checked and gave torchrun."""

import os
import re
import shutil
from pathlib import Path

import netns_hosts
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import PYTHON, ROOT, run, worker_env
from slurm_cluster import SlurmCluster, skip_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TRAIN = ["4", "2", "--batch_size", "64", "--snapshot_path", "snapshot.pt"]
# a few steps of the tiny GPT / Llama: enough to evaluate, save and finish
TINY_LM = ["--max_steps", "6", "--eval_every", "3", "--eval_batches", "1", "--save_every", "3"]
TINY_LM += ["--sample_every", "0", "--batch_size", "4"]
JOB_NAME = {
    "multinode.sh": "ddp-multinode",
    "gpt.sh": "ddp-gpt",
    "llama.sh": "ddp-llama",
    "fsdp.sh": "ddp-fsdp",
}


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


CPU = "--gpus-per-node=0"  # the scripts' CPU opt-in: they ask for GPUs otherwise


def run_job(cluster, folder, sbatch_args, script="multinode.sh", args=TRAIN, nproc=2):
    """`sbatch --gpus-per-node=0 [SBATCH_ARGS] slurm/SCRIPT ARGS...` with NPROC processes per
    node; returns the job log once the job reached COMPLETED."""
    env = job_env(cluster, NPROC_PER_NODE=nproc)
    job = cluster.sbatch([CPU, *sbatch_args, ROOT / "slurm" / script, *args], folder, env)
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
    assert "2 processes per node on cpu, rendezvous at 127.0.0.1:29500" in log  # loopback: fine
    assert "[cpu x 2] epoch 3" in log and "snapshot saved at snapshot.pt" in log
    assert (folder / "snapshot.pt").exists()


@pytest.fixture(scope="module")
def two_nodes():
    """A controller host and two compute hosts, each in its own network namespace, each with 8
    stand-in GPUs."""
    if skip_reason() or netns_hosts.skip_reason():
        pytest.skip(skip_reason() or netns_hosts.skip_reason())
    with netns_hosts.network(["ctl", "node1", "node2"]) as hosts:
        with SlurmCluster.in_namespaces(hosts, "ctl", ["node1", "node2"], gpus=8) as cluster:
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
def test_fsdp_script_on_two_nodes_writes_one_shard_per_rank(tmp_path, two_nodes):
    prepare = [PYTHON, ROOT / "05_gpt_ddp" / "prepare.py", "--tokenizer", "char"]
    run([*prepare, "--data_dir", tmp_path / "data", "--max_bytes", "200000"], check=True)
    (tmp_path / "08_fsdp").symlink_to(ROOT / "08_fsdp")
    args = ["--preset", "tiny", "--stage", "zero3", "--data_dir", "data", "--out_dir", "out"]
    log = run_job(two_nodes, tmp_path, [], "fsdp.sh", [*args, *TINY_LM], nproc=2)
    # a world of 4 ranks: two torchruns (two ranks each), one on each host
    assert torchrun_hosts(log) == ["node1", "node2"], log
    assert "4 rank(s) on cpu" in log and "done: out/ckpt-000006" in log, log
    ckpt = tmp_path / "out" / "ckpt-000006"
    shards = [f"__{rank}_0.distcp" for rank in range(4)]  # DCP: one file per rank
    assert sorted(f.name for f in ckpt.glob("*.distcp")) == shards
    # zero3: every weight and AdamW state is split over the 4 ranks, so each lies in 4 files;
    # a rank that gathered a whole tensor would have written it alone (at ddp: 1 file each)
    files = {}
    for index, stored in dcp.FileSystemReader(ckpt).read_metadata().storage_data.items():
        files.setdefault(index.fqn, set()).add(stored.relative_path)
    sharded = [fqn for fqn in files if not fqn.endswith(".step")]  # AdamW's step: a scalar
    assert len(sharded) > 50 and all(files[fqn] == set(shards) for fqn in sharded), files


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
            [CPU, ROOT / "slurm" / "multinode.sh", *TRAIN], submit_from(tmp_path), env
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


SCRIPTS = ["multinode.sh", "gpt.sh", "llama.sh", "fsdp.sh"]
# what each script runs, and the arguments it gives by default
TRAINS = {
    "multinode.sh": "04_multinode.py --device {} 50 10",
    "gpt.sh": "05_gpt_ddp/train.py --resume --device {} --preset gpt2-124m",
    "llama.sh": "06_llama_ddp/train.py --resume --device {} --train_file train.pkl "
    "--valid_file val.pkl",
    "fsdp.sh": "08_fsdp/train.py --resume --device {} --preset gpt-1.4b --batch_size 4",
}


@pytest.mark.multihost
def test_the_scripts_ask_for_gpus(tmp_path, two_nodes):
    # What each script asks Slurm for, read back from the controller; a held job never starts.
    asked = {}
    for script in SCRIPTS:
        job = two_nodes.sbatch(["--hold", ROOT / "slurm" / script], tmp_path, job_env(two_nodes))
        asked[script] = two_nodes.job(job).get("TresPerNode")
        two_nodes.client("scancel", job)
    assert asked == dict.fromkeys(SCRIPTS, "gres:gpu:8")


@pytest.mark.multihost
def test_a_gpu_job_that_finds_no_gpu_stops_in_one_line_per_node(tmp_path, two_nodes):
    # Slurm gives both nodes their 8 (stand-in) GPUs, and this PyTorch sees none of them, as a
    # wheel built for a newer CUDA than the driver would not. The job must end before torchrun.
    job = two_nodes.sbatch([ROOT / "slurm" / "gpt.sh"], tmp_path, job_env(two_nodes))
    state = two_nodes.wait(job, timeout=120)
    log = (tmp_path / f"ddp-gpt-{job}.log").read_text()
    assert state == "FAILED", log
    # the script's lines only; srun and slurmstepd then say how they ended the step
    ours = [line for line in log.splitlines() if not line.startswith(("srun: ", "slurmstepd"))]
    if torch.version.cuda is None:
        why = re.escape("this PyTorch is built without CUDA (a CPU-only wheel)")
    else:  # a CUDA wheel on nodes without a driver: PyTorch's own warning, or the driver question
        why = r"\S.*"
    pattern = rf"error: PyTorch \S+ on (node[12]) sees 0 GPUs, needs 8: {why}"
    assert sorted(re.fullmatch(pattern, line)[1] for line in ours) == ["node1", "node2"], log
    assert "torchrun on" not in log


def fake_slurm(folder):
    """An srun that runs its command right here, one node, and a python (the GPU check: passes)
    and a torchrun that only write down how they were called."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    stubs = {
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"',  # drop its options
        "scontrol": "echo node1",
        "python": 'echo "python $1 $3" >> calls',  # $2: the code
        "torchrun": 'echo "torchrun $*" >> calls',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1"}
    return dict(slurm, PATH=f"{bin_dir}{os.pathsep}/usr/bin:/bin")


def body(script):
    """A script's lines below its header (which ends at the job name), without the two lines
    that name its step: the default arguments and the train.py it runs."""
    lines = (ROOT / "slurm" / script).read_text().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if "--job-name" in line) + 1 :]
    return [line for line in lines if not line.startswith(("if [ $# -eq 0 ]", "    0"))]


@pytest.mark.parametrize("script", ["llama.sh", "fsdp.sh"])
def test_the_step_scripts_are_gpt_sh_for_another_step(script):
    # a reader diffs gpt.sh and this one: only the header and the step may differ
    assert body(script) == body("gpt.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_jobs_train_on_cuda_and_cpu_only_when_asked(tmp_path, script):
    # The script as Slurm starts it on a node, with what Slurm sets for each request.
    gpus = {"SLURM_GPUS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}  # the script's own request
    runs = {}
    for case, slurm in [("gpus", gpus), ("cpu", {"SLURM_GPUS_PER_NODE": "0"}), ("none", {})]:
        folder = tmp_path / case
        folder.mkdir()
        env = dict(fake_slurm(folder), **slurm)
        out = run(["bash", ROOT / "slurm" / script], cwd=folder, env=env, timeout=30)
        calls = folder / "calls"
        runs[case] = (out, calls.read_text().splitlines() if calls.exists() else [])
    out, (check, torchrun) = runs["gpus"]
    assert out.returncode == 0, out.stderr
    assert check == "python -c 8"  # the GPU check ran (python -c CODE 8), for 8 processes
    assert "--nproc_per_node=8 " in torchrun and torchrun.endswith(TRAINS[script].format("cuda"))
    out, calls = runs["cpu"]
    assert out.returncode == 0, out.stderr
    assert len(calls) == 1 and calls[0].startswith("torchrun "), calls  # no GPU check
    assert "--nproc_per_node=1 " in calls[0] and calls[0].endswith(TRAINS[script].format("cpu"))
    out, calls = runs["none"]
    assert out.returncode == 1 and calls == []
    assert out.stderr == (
        "error: Slurm gave this job no GPUs: ask for them (sbatch --gpus-per-node=N), or submit "
        "with --gpus-per-node=0 for a CPU run\n"
    )


WORKER = """import os, socket, sys
rank, addr = os.environ["RANK"], os.environ["MASTER_ADDR"]
sys.stdout.write(f"worker {rank} on {socket.gethostname()}: MASTER_ADDR {addr}\\n")
"""


@pytest.mark.multihost
def test_every_worker_gets_the_address_the_script_checked(tmp_path, two_nodes):
    # A stand-in for 04_multinode.py that only says what torchrun told it.
    (tmp_path / "04_multinode.py").write_text(WORKER)
    log = run_job(two_nodes, tmp_path, [], args=[], nproc=2)
    checked = dict(re.findall(r"torchrun on ([\w-]+) at ([\d.]+)", log))
    assert checked == {node: two_nodes.hosts.addr[node] for node in ("node1", "node2")}, log
    workers = re.findall(r"worker (\d) on ([\w-]+): MASTER_ADDR ([\w.-]+?)(?=worker |\s)", log)
    assert sorted(rank for rank, *_ in workers) == ["0", "1", "2", "3"], log
    # rank 0's node hosts the process group's store: every worker must connect to the address
    # that node checked, not to a name (socket.getfqdn(), torchrun's default)
    rank0_node = next(node for rank, node, _ in workers if rank == "0")
    assert {addr for *_, addr in workers} == {checked[rank0_node]}, log


@pytest.mark.multihost
@pytest.mark.parametrize("script", SCRIPTS)
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
    job = two_nodes.sbatch([CPU, ROOT / "slurm" / script], tmp_path, env)
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
