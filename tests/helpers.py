"""Shared test helpers: run scripts as real subprocesses, each with a timeout, on CPU.

Every multi-process test oversubscribes the 2 cores of CI, so workers get OMP_NUM_THREADS=1.
Nothing here sleeps to synchronise: `wait_for` polls a condition until a deadline.
"""

import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def worker_env(**extra):
    """Environment for a script under test: CPU only, one thread, unbuffered output."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        # torchrun 2.13 restarts can otherwise reconnect to a dead worker's old store address.
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        PYTHONPATH=str(ROOT),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(*args):
    """The `torchrun` command, through this interpreter so the test venv is used."""
    return [PYTHON, "-m", "torch.distributed.run", *map(str, args)]


def script(name):
    return str(ROOT / name)


def stop(proc, grace=15):
    """Stop a process started with `start`: SIGTERM first (torchrun forwards it), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers in the group, e.g. orphaned workers
    except ProcessLookupError:
        pass
    proc.wait()


def start(cmd, cwd=None, env=None, **kwargs):
    """Start `cmd` in its own process group, stdout+stderr merged into one text pipe."""
    return subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd or ROOT,
        env=env or worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if kwargs.pop("merge", True) else subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def run(cmd, timeout=120, cwd=None, env=None, check=False):
    """Run `cmd` to completion; a hang past `timeout` seconds fails the test with the output so far.

    Returns a CompletedProcess with separate stdout and stderr.
    """
    proc = start(cmd, cwd=cwd, env=env, merge=False)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
        ) from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}: {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
        )
    return result


def wait_for(condition, timeout, what, interval=0.05):
    """Poll `condition()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _children(pid):
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # the command name in field 2 may hold spaces; the parent pid follows the last ')'
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        for kid in _children(todo.pop()):
            found.append(kid)
            todo.append(kid)
    return found


def worker_pids(agent_pid):
    """PIDs of the training workers a torchrun agent started (they have LOCAL_RANK set)."""
    pids = []
    for pid in descendants(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(var.startswith(b"LOCAL_RANK=") for var in environ):
            pids.append(pid)
    return pids


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(relpath, name=None):
    """Import a script by file name (numbered scripts like 02_multigpu_mp_spawn.py are not
    valid module names)."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_step(folder, *names):
    """Modules of one step folder (e.g. "05_gpt_ddp", "train", "report"), imported as the folder's
    own scripts import each other: train.py does `import report`, `from model import ...`. Other
    steps have files of the same names, so whatever sys.modules held under the folder's plain
    module names is put back afterwards. Returns the modules in the order asked."""
    path = ROOT / folder
    plain = [p.stem for p in path.glob("*.py")]
    saved = {name: sys.modules.pop(name, None) for name in plain}
    sys.path.insert(0, str(path))
    try:
        modules = [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(path))
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module
    return modules[0] if len(modules) == 1 else modules
