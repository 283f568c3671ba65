"""Plant a bug in a real training run, to practise finding out why a job hangs (docs/debugging.md).

    torchrun --standalone --nproc_per_node=2 tools/desync.py --rank 1 --stall 3 04_multinode.py 2 1

Runs a training script under torchrun exactly as torchrun would, with one difference on one rank
(--rank): at its N-th call of torch.distributed.all_reduce, that rank either
  --skip N:  returns without taking part (the classic bug: a collective under `if rank == 0:`),
  --stall N: never gets there (it sleeps, as a rank stuck in I/O or a deadlock would).
The other ranks run the script unchanged. Step 04 calls all_reduce twice at start (the epoch
check) and twice per epoch (train and validation loss); DDP's gradient all-reduces are not counted.

Debugging aids for every rank, as you would add them to your own script:
  --timeout S: every collective gives up after S seconds (default: 30 min with gloo, 10 with NCCL);
  kill -USR1 PID: the process prints the Python stack of each of its threads to stderr;
  kill -USR2 PID: with TORCH_FR_BUFFER_SIZE set, the process writes its flight recorder (its last
    collectives) to TORCH_FR_DUMP_TEMP_FILE + its rank, for
    `python -m torch.distributed.flight_recorder.fr_trace FOLDER`. (NCCL writes it by itself on a
    timeout; gloo does not.)
"""

import argparse
import datetime
import faulthandler
import os
import runpy
import signal
import sys
import threading
import time

import torch.distributed as dist
from torch._C._distributed_c10d import _dump_fr_trace

PROG = "desync.py"


def parse_args():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=1, help="the rank with the bug (default: 1)")
    bug = parser.add_mutually_exclusive_group(required=True)
    bug.add_argument("--skip", type=int, metavar="N", help="skip the N-th all_reduce")
    bug.add_argument("--stall", type=int, metavar="N", help="stall before the N-th all_reduce")
    parser.add_argument("--timeout", type=float, help="seconds before a collective gives up")
    parser.add_argument("script", help="the training script, then its arguments")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error(
            "start me with torchrun, e.g. torchrun --standalone --nproc_per_node=2 " + PROG
        )
    return args


def plant(nth, skip):
    """Replace dist.all_reduce by one that misbehaves at its nth call."""
    real = dist.all_reduce
    calls = 0

    def all_reduce(tensor, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            what = "skips" if skip else "stalls before"
            sys.stderr.write(f"{PROG}: rank {os.environ['RANK']} {what} all_reduce number {nth}\n")
            if skip:
                return None
            stalled_forever()
        return real(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce


def stalled_forever():
    while True:
        time.sleep(1)


def with_timeout(seconds):
    """init_process_group with a collective timeout, whatever the script passes."""
    real = dist.init_process_group

    def init_process_group(*args, **kwargs):
        kwargs["timeout"] = datetime.timedelta(seconds=seconds)
        return real(*args, **kwargs)

    dist.init_process_group = init_process_group


def dump_flight_recorder_on_sigusr2():
    """A thread that waits for SIGUSR2. Not a signal handler: Python runs those in the main
    thread only, between two bytecodes, and a rank stuck in a collective runs none."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})  # every thread started later too

    def wait_and_dump():
        while True:
            signal.sigwait({signal.SIGUSR2})
            path = os.environ.get("TORCH_FR_DUMP_TEMP_FILE", "/tmp/nccl_trace_rank_")
            path += os.environ["RANK"]
            with open(path + ".tmp", "wb") as f:
                f.write(_dump_fr_trace())
            os.replace(path + ".tmp", path)
            sys.stderr.write(f"{PROG}: rank {os.environ['RANK']} wrote {path}\n")

    threading.Thread(target=wait_and_dump, daemon=True).start()


def main():
    args = parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    dump_flight_recorder_on_sigusr2()
    if args.timeout:
        with_timeout(args.timeout)
    if int(os.environ["RANK"]) == args.rank:
        plant(args.skip or args.stall, skip=args.skip is not None)
    sys.stderr.write(f"{PROG}: rank {os.environ['RANK']} is pid {os.getpid()}\n")
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
