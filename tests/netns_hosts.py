"""Several "machines" on one computer, for the multi-node tests: one network namespace per host.

Layout: a "switch" namespace holding a bridge, and one namespace per host plugged into it by a
veth pair. All addresses are 10.213.0.x and exist only inside these namespaces; the machine's own
network (the root namespace) gets nothing new but the /etc/netns files.

    namespace ddpt-PID-switch    bridge br0    (no address)
    namespace ddpt-PID-node1     eth0          10.213.0.1    hostname node1
    namespace ddpt-PID-node2     eth0          10.213.0.2    hostname node2

PID is the test process's: two test runs at once (two people on one machine) each get their own
network and never touch the other's. Each host gets its own /etc/hosts
(`/etc/netns/ddpt-PID-NAME/hosts`, which `ip netns exec` mounts over /etc/hosts) naming every host,
so a plain `--rdzv_endpoint=node1:29500` resolves as on a cluster. Every host has its own address,
so nothing can accidentally talk over 127.0.0.1: a process that binds or connects to the wrong
address fails the test instead of passing by luck.

Needs root, `ip` (iproute2) and `unshare`/`nsenter` (util-linux); `skip_reason()` says what is
missing. `network(...)` removes namespaces, links and hosts files on exit, even after a failure, and
also removes leftovers of an earlier run that was killed before it could clean up.
"""

import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

PREFIX = "ddpt-"  # every namespace and /etc/netns folder made here starts with this, then a pid
SUBNET = "10.213.0"


def own_prefix():
    """The start of the names of this process's namespaces."""
    return f"{PREFIX}{os.getpid()}-"


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def skip_reason():
    """Why the namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install iproute2 util-linux)"
    probe = own_prefix() + "probe"
    made = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


class Hosts:
    """Names and addresses of the hosts made by `network`."""

    def __init__(self, names):
        self.names = list(names)
        self.addr = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}

    @staticmethod
    def netns(name):
        return own_prefix() + name

    def run_cmd(self, name, cmd):
        """`cmd` as a process on host `name`: its network, its /etc/hosts, its hostname."""
        script = 'hostname "$0" && exec "$@"'
        netns = ["ip", "netns", "exec", self.netns(name)]
        return [*netns, "unshare", "--uts", "sh", "-c", script, name, *map(str, cmd)]

    def kill_everything_on(self, name):
        """SIGKILL every process on host `name`, as when the machine loses power: no process
        there gets to clean up (torchrun starts its workers in sessions of their own, so killing
        the agent's process group would miss them). The host stays and can start programs again.
        Returns the pids killed."""
        pids = [int(pid) for pid in sh("ip", "netns", "pids", self.netns(name)).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def daemon_cmd(self, name, cmd):
        """Like `run_cmd`, but for daemons such as slurmd that need the real /sys: `ip netns exec`
        remounts /sys (slurmd then dies), so enter only the network namespace and mount the hosts
        file ourselves, in a private mount namespace."""
        hosts_file = f"/etc/netns/{self.netns(name)}/hosts"
        script = f'hostname "$0" && mount --bind {hosts_file} /etc/hosts && exec "$@"'
        netns = ["nsenter", f"--net=/run/netns/{self.netns(name)}"]
        unshare = ["unshare", "--uts", "--mount", "--propagation", "private"]
        return [*netns, *unshare, "sh", "-c", script, name, *map(str, cmd)]


def _hosts_file(hosts):
    lines = ["127.0.0.1 localhost"]
    lines += [f"{hosts.addr[name]} {name}" for name in hosts.names]
    return "\n".join(lines) + "\n"


def _owner_gone(name):
    """True for a namespace or folder of a test process that no longer runs."""
    found = re.match(rf"{PREFIX}(\d+)-", name)
    return found is not None and not Path(f"/proc/{found[1]}").exists()


def remove(prefix):
    """Remove every namespace and hosts folder whose name starts with `prefix`, killing what runs
    inside."""
    listed = sh("ip", "netns", "list", check=False).stdout.split()
    for ns in [word for word in listed if word.startswith(prefix)]:
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", ns, check=False)  # deleting a namespace deletes its veth ends
    for folder in Path("/etc/netns").glob(prefix + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_leftovers():
    """Remove what test processes killed before their clean-up left behind (never another
    running process's network)."""
    listed = sh("ip", "netns", "list", check=False).stdout.split()
    folders = [f.name for f in Path("/etc/netns").glob(PREFIX + "*")]
    for name in {*listed, *folders}:
        if _owner_gone(name):
            remove(name)


def create(names):
    remove_leftovers()
    hosts = Hosts(names)
    remove(own_prefix())  # an earlier network of this same process
    switch = hosts.netns("switch")
    sh("ip", "netns", "add", switch)
    sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", switch, "link", "set", "br0", "up")
    for i, name in enumerate(hosts.names):
        ns, port = hosts.netns(name), f"port{i}"
        folder = Path("/etc/netns") / ns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(_hosts_file(hosts))
        sh("ip", "netns", "add", ns)
        # made inside the switch namespace, so the machine's own network never sees either end
        sh(
            "ip",
            "-n",
            switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        sh("ip", "-n", switch, "link", "set", port, "master", "br0")
        sh("ip", "-n", switch, "link", "set", port, "up")
        sh("ip", "-n", ns, "addr", "add", f"{hosts.addr[name]}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    return hosts


@contextmanager
def network(names=("node1", "node2")):
    """Create the hosts, yield a `Hosts`, and always remove everything afterwards."""
    try:
        yield create(names)
    finally:
        remove(own_prefix())
