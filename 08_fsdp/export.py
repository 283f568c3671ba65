"""Turn train.py's sharded checkpoint into one file that 05_gpt_ddp/generate.py reads.

    python 08_fsdp/export.py --out_dir 08_fsdp/out      # the latest ckpt-* -> 08_fsdp/out/ckpt.pt
    python 08_fsdp/export.py --out_dir 08_fsdp/out --best                     # -> .../best.pt
    python 05_gpt_ddp/generate.py --checkpoint 08_fsdp/out/ckpt.pt --prompt "def "

One process, no GPU: DCP reads every rank's shard into whole tensors on the CPU (for gpt-1.4b
5.7 GB of weights; the optimizer states are left out, as generate.py needs none).
"""

import argparse
import os
import sys
from pathlib import Path

import checkpoint
import torch
import torch.distributed.checkpoint as dcp
from model import CHECKPOINT_FORMAT, GPT, GPTConfig

PROG = "export.py"


def fail(message):
    sys.exit(f"{PROG}: error: {message}")


def export(ckpt_dir, output):
    meta = checkpoint.read_meta(ckpt_dir, fail)
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["config"]))
    model.to_empty(device="cpu")
    if model.cfg.tie_weights:  # to_empty gave head its own tensor: tie it again, as GPT does
        model.head.weight = model.wte.weight
    # read the weights only: DCP fills these whole tensors from all ranks' pieces
    dcp.load({"model": dict(model.named_parameters())}, checkpoint_id=ckpt_dir, no_dist=True)
    state = {
        "format": CHECKPOINT_FORMAT,  # step 05's checkpoint format: what generate.py reads
        "model": model.state_dict(),
        "step": meta["step"],
        "world_size": meta["world_size"],
        "preset": meta["preset"],
        "config": meta["config"],
        "tokenizer": meta["tokenizer"],
        "args": meta["args"],
    }
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        os.fsync(f.fileno())
    os.replace(tmp, output)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", type=Path, required=True, help="train.py's --out_dir")
    p.add_argument("--best", action="store_true", help="best-* (lowest val loss), not ckpt-*")
    p.add_argument("--output", type=Path, help="default: out_dir/ckpt.pt (--best: best.pt)")
    args = p.parse_args(argv)
    prefix = checkpoint.BEST if args.best else checkpoint.LATEST
    found = checkpoint.checkpoints(args.out_dir, prefix)
    if not found:
        fail(f"no checkpoint ({prefix}*) in {args.out_dir}")
    output = args.output or args.out_dir / ("best.pt" if args.best else "ckpt.pt")
    meta = export(found[-1], output)
    saved = f"step {meta['step']}, {meta['world_size']} ranks, {meta['stage']}"
    print(f"{found[-1]} ({saved}) -> {output}")


if __name__ == "__main__":
    main()
