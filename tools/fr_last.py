"""Where the ranks part: each rank's last collectives, from flight recorder dumps.

    python tools/fr_last.py fr/        # the folder of the dumps, one file per rank: PREFIX0, ...

PyTorch's own analyser (`python -m torch.distributed.flight_recorder.fr_trace FOLDER`) reads the
dumps NCCL writes; in torch 2.13 it stops with a KeyError on gloo's (their process group has an
empty name). This prints, per rank, how many collectives it enqueued and completed, and its last
ones: the rank that enqueued fewer never called the collective the others wait in. See
docs/debugging.md.
"""

import argparse
import pickle
import re
import sys
from pathlib import Path

PROG = "fr_last.py"


def describe(entry):
    sizes = "x".join(map(str, entry["input_sizes"][0])) if entry["input_sizes"] else "-"
    dtypes = ",".join(entry["input_dtypes"])
    return f"#{entry['collective_seq_id']} {entry['profiling_name']} [{sizes}] {dtypes}"


def main():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="folder with one dump per rank")
    parser.add_argument("--last", type=int, default=2, help="entries shown per rank (default: 2)")
    args = parser.parse_args()
    dumps = sorted(args.folder.glob("*[0-9]"), key=lambda p: int(re.findall(r"\d+$", p.name)[0]))
    if not dumps:
        sys.exit(f"{PROG}: error: no dump (a file whose name ends in its rank) in {args.folder}")
    for path in dumps:
        rank = re.findall(r"\d+$", path.name)[0]
        with open(path, "rb") as f:
            dump = pickle.load(f)  # written by torch itself: a dict of plain values
        for status in dump["pg_status"].values():
            print(
                f"rank {rank}: enqueued {status['last_enqueued_collective']}, "
                f"completed {status['last_completed_collective']}; last: "
                + " | ".join(describe(e) for e in dump["entries"][-args.last :])
            )


if __name__ == "__main__":
    main()
