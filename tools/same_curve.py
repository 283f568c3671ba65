"""Draw the training loss of 1, 2 and 4 DDP processes at the same global batch on one plot.

    python tools/same_curve.py            # writes docs/img/same_curve.png (about a minute on a CPU)

It runs step 03 under torchrun three times: 1 process with --batch_size 64, 2 with 32, 4 with
16. Every optimizer step then sees the same 64 samples, split differently between the processes,
and DDP averages the gradients. If DDP is "one big batch", the three curves must lie on top of
each other. The losses are the ones step 03 prints: the mean over all processes' samples.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 64
LINE = re.compile(r"epoch (\d+) \| .* train loss ([\d.]+) \| val loss ([\d.]+)")


def run(world_size, epochs, folder):
    """Step 03's per-epoch (train loss, val loss) with world_size processes."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc_per_node={world_size}",
        str(ROOT / "03_multigpu_torchrun.py"),
        *(str(epochs), str(epochs)),
        f"--batch_size={GLOBAL_BATCH // world_size}",
        f"--snapshot_path={folder / f'snapshot_{world_size}.pt'}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, check=True
    ).stdout
    losses = [(float(m[2]), float(m[3])) for m in LINE.finditer(out)]
    if len(losses) != epochs:
        sys.exit(f"same_curve.py: error: expected {epochs} epoch lines, got:\n{out}")
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "same_curve.png")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    with tempfile.TemporaryDirectory() as folder:
        for world_size, style in [(1, "-"), (2, "--"), (4, ":")]:
            losses = run(world_size, args.epochs, Path(folder))
            train = [t for t, _ in losses]
            processes = f"{world_size} process" + ("es" if world_size > 1 else "")
            label = f"{processes} x batch {GLOBAL_BATCH // world_size}"
            ax.plot(
                range(len(train)), train, style, linewidth=2.5 - 0.5 * world_size / 2, label=label
            )
            print(f"{label}: train loss per epoch {' '.join(f'{t:.4f}' for t in train)}")
    ax.set_yscale("log")
    ax.set(
        xlabel="epoch",
        ylabel="training loss (mean over all processes)",
        title=f"Step 03, global batch {GLOBAL_BATCH}: one big batch, however it is split",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
