"""A real, throw-away Slurm cluster for the tests: munged, slurmctld and one slurmd per node.

Installs nothing (Debian's `slurmctld slurmd slurm-client munge` must be there: see
.ci/install-system-packages.sh) and touches nothing outside its own temp folder: its own munge
key and socket, its own slurm.conf, state, spool and logs. Client commands find the cluster through
SLURM_CONF (see `env()`). Needs root, as slurmd does on any cluster.

Two layouts:
- `SlurmCluster.single()`: one node, this machine, on 127.0.0.1;
- `SlurmCluster.in_namespaces(hosts, "ctl", ["node1", "node2"])`: the controller and every node
  each in its own network namespace (tests/netns_hosts.py), with its own hostname and address, as
  on a real cluster.

`gpus=N` gives every node N stand-in GPUs (a GRES of empty files): Slurm schedules and counts
them as on a GPU cluster, so a job's GPU request and what the script does with it can be
tested; nothing can compute on them, and a CPU-only PyTorch sees none.

    with SlurmCluster.single() as cluster:
        job = cluster.sbatch(["slurm/multinode.sh"], cwd=workdir)
        state = cluster.wait(job, timeout=180)   # "COMPLETED", "FAILED", ...

Runnable by hand to poke at it: `python tests/slurm_cluster.py` starts a one-node cluster, prints
the SLURM_CONF to export, and stops it on Ctrl-C.
"""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PREFIX = "ddpt-slurm-"  # every cluster's temp folder starts with this
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def skip_reason():
    """Why a Slurm cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to run slurmd and munged (CI runs as root)"
    for tool in (*DAEMONS, "sbatch", "scontrol"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
            return f"needs `{tool}`: run .ci/install-system-packages.sh (Debian's slurm and munge)"
    return None


def remove_leftovers():
    """Kill what an earlier, killed test run may have left: daemons started with one of our
    folders on their command line, and job processes with SLURM_CONF pointing into one."""
    marker = f"{tempfile.gettempdir()}/{PREFIX}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            found = marker in (entry / "cmdline").read_bytes()
            found = found or marker in (entry / "environ").read_bytes()
        except OSError:  # gone already, or a kernel thread
            continue
        if found:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for folder in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout, what, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    tails = "".join(f"\n--- {p} ---\n{_tail(p)}" for p in logs)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}{tails}")


def _tail(path, chars=3000):
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no file)"


class SlurmCluster:
    def __init__(self, controller, nodes, hosts=None, cpus=2, gpus=0):
        """`controller` and `nodes` are (name, address) pairs; `hosts` a netns_hosts.Hosts when the
        machines live in network namespaces, else None (everything on this machine)."""
        self.controller, self.nodes, self.hosts, self.cpus = controller, nodes, hosts, cpus
        self.gpus = gpus
        self.procs = []
        self.dir = self.conf = self.logs = None  # made by start()

    @classmethod
    def single(cls, cpus=2, gpus=0):
        name = socket.gethostname().split(".")[0]
        return cls((name, "127.0.0.1"), [(name, "127.0.0.1")], cpus=cpus, gpus=gpus)

    @classmethod
    def in_namespaces(cls, hosts, controller, nodes, cpus=2, gpus=0):
        nodes = [(name, hosts.addr[name]) for name in nodes]
        return cls((controller, hosts.addr[controller]), nodes, hosts=hosts, cpus=cpus, gpus=gpus)

    # --- running -------------------------------------------------------------------------------

    def env(self, **extra):
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def client_cmd(self, cmd):
        """A client command (sbatch, scontrol) as run on the controller host."""
        cmd = [str(c) for c in cmd]
        return self.hosts.run_cmd(self.controller[0], cmd) if self.hosts else cmd

    def client(self, *cmd, cwd=None, env=None, timeout=30):
        return subprocess.run(
            self.client_cmd(cmd),
            cwd=cwd,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def sbatch(self, args, cwd, env=None):
        """Submit a batch job; returns its job id."""
        out = self.client("sbatch", "--parsable", *args, cwd=cwd, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}{self.daemon_logs()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id):
        """`scontrol show job` as a dict (accounting is off, so no sacct)."""
        out = self.client("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id, timeout):
        """Poll until the job finishes; returns its final state, e.g. "COMPLETED"."""
        state = {}

        def finished():
            state.update(self.job(job_id))
            return state.get("JobState") in FINISHED

        try:
            _wait(finished, timeout, f"job {job_id} to finish")
        except RuntimeError as e:  # say where it got stuck: RUNNING, PENDING (and why), ...
            last = f"last seen: {state.get('JobState')}, reason {state.get('Reason')}"
            raise RuntimeError(f"{e}; {last}{self.daemon_logs()}") from None
        return state["JobState"]

    def log_files(self):
        """The daemons' logs, and their output (where a daemon that dies at start says why)."""
        return [*sorted(self.logs.glob("*")), self.dir / "munge" / "munged.log"] if self.dir else []

    def daemon_logs(self):
        return "".join(f"\n--- {p} ---\n{_tail(p)}" for p in self.log_files())

    # --- starting and stopping ------------------------------------------------------------------

    def write_config(self):
        ctl_name, ctl_addr = self.controller
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        gres_types = "GresTypes=gpu" if self.gpus else "# no GRES"
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={self.cpus}{gres} State=UNKNOWN"
            for n, a in self.nodes
        )
        d = self.dir
        # In one shared network namespace, take free ports so nothing clashes with a real Slurm.
        ctl_port, node_port = (6817, 6818) if self.hosts else (_free_port(), _free_port())
        self.conf.write_text(
            f"""\
ClusterName=ddpt
{gres_types}
SlurmctldHost={ctl_name}({ctl_addr})
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups and no systemd here: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# nodes share this machine's 2 cores: trust the CPUs= below, not the hardware
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir()
        if self.gpus:
            self.write_gres()

    def write_gres(self):
        """Stand-in GPUs: Slurm wants a device file per GPU, and an empty file will do."""
        (self.dir / "dev").mkdir()
        for i in range(self.gpus):
            (self.dir / "dev" / f"gpu{i}").touch()
        files = f"{self.dir}/dev/gpu[0-{self.gpus - 1}]"
        (self.dir / "gres.conf").write_text(f"Name=gpu File={files}\n")  # next to slurm.conf

    def start_munged(self):
        munge = pwd.getpwnam("munge")
        folder = self.dir / "munge"
        folder.mkdir()
        folder.chmod(0o755)  # munged insists that everyone may reach its socket
        key = folder / "munge.key"
        key.write_bytes(os.urandom(128))  # a fresh key: only this cluster trusts it
        key.chmod(0o600)
        for path in (folder, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        cmd = [
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={folder}/munge.socket",
            f"--pid-file={folder}/munged.pid",
            f"--log-file={folder}/munged.log",
            f"--seed-file={folder}/munged.seed",
        ]
        # munged refuses to run as root; the user switch happens in the child before exec.
        self._spawn(cmd, "munged", user=munge)
        socket_path = folder / "munge.socket"
        _wait(socket_path.exists, 20, "munged's socket", [folder / "munged.log"])

    def _spawn(self, cmd, name, host=None, user=None):
        if host is not None:
            cmd = self.hosts.daemon_cmd(host, cmd)
        setid = None
        if user is not None:

            def setid():
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        with open(self.logs / f"{name}.out", "w") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=setid,
                env=self.env(),
                cwd=self.dir,
            )
        self.procs.append((name, proc))
        return proc

    def nodes_idle(self):
        out = self.client("sinfo", "--noheader", "--format=%N %t", "--Node").stdout.split()
        states = dict(zip(out[0::2], out[1::2], strict=False))
        return all(states.get(n) == "idle" for n, _ in self.nodes)

    def start(self, timeout=60):
        remove_leftovers()  # one cluster at a time: an earlier one's daemons would hold the ports
        # Not under pytest's tmp_path: munged runs as the munge user, who must reach its files.
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        self.dir.chmod(0o755)
        self.conf, self.logs = self.dir / "slurm.conf", self.dir / "log"
        self.write_config()
        self.start_munged()
        ctl_host = self.controller[0] if self.hosts else None
        self._spawn(["slurmctld", "-D", "-i", "-f", self.conf], "slurmctld", host=ctl_host)
        for name, _ in self.nodes:
            self._spawn(
                ["slurmd", "-D", "-N", name, "-f", self.conf],
                f"slurmd-{name}",
                host=name if self.hosts else None,
            )
        _wait(self.nodes_idle, timeout, "every node to be idle", self.log_files())
        return self

    def stop(self):
        """Stop every daemon this cluster started (SIGTERM, then SIGKILL) and remove its folder.
        Jobs still running are cancelled first so no training process outlives the test."""
        if (
            self.conf
            and self.conf.exists()
            and any(p.poll() is None for n, p in self.procs if n == "slurmctld")
        ):
            self.client("scancel", "--user=root")
            try:  # let slurmd end the jobs' processes before slurmd itself goes
                _wait(lambda: not self.client("squeue", "--noheader").stdout.strip(), 30, "jobs")
            except RuntimeError:
                pass  # remove_leftovers() of the next cluster kills what is left
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    with SlurmCluster.single() as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")
        signal.pause()
