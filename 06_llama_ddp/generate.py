"""Complete a prompt with a Llama trained by train.py.

    python 06_llama_ddp/generate.py --checkpoint 06_llama_ddp/out/ckpt.pt --prompt "def main(" \
        --max_new_tokens 200 --temperature 0.8 --top_k 50

Token files carry no tokenizer. A model with a byte vocabulary (256 ids, as make_toy_data.py
writes them) reads the prompt as text and prints text; for any other vocabulary the prompt and
the output are token ids, to be decoded by the tokenizer that made the token files.

Only the weights are read: the checkpoint is memory-mapped on the CPU and its optimizer state
(AdamW's two moments, twice the weights) is never loaded, nor moved to the GPU.
"""

import argparse
import sys
from pathlib import Path

import torch
from model import CHECKPOINT_FORMAT, Llama, LlamaConfig
from train import decode

PROG = "generate.py"
SEPARATOR = 0  # make_toy_data.py puts byte 0 between documents: a prompt starts a document


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="written by train.py: out/ckpt.pt (the last save) or out/best.pt (best val loss)",
    )
    p.add_argument("--prompt", default="\n", help="text; for a non-byte vocabulary, ids: '1 5 7'")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: always the likeliest token")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0 or args.top_k <= 0 or args.num_samples <= 0:
        p.error("--max_new_tokens, --top_k and --num_samples must be positive")
    if args.temperature < 0:
        p.error("--temperature must not be negative")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
    return args


def load_weights(path):
    """The checkpoint without its optimizer state. mmap: tensors stay in the file until read, so
    the AdamW states (twice the weights) never reach memory; and the CPU, not the GPU, holds
    what is read until the model copies its weights from it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # missing, truncated, or not a torch file
        sys.exit(f"{PROG}: error: cannot read checkpoint {path} ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        sys.exit(f"{PROG}: error: {path} is not a checkpoint written by 06_llama_ddp/train.py")
    ckpt.pop("optimizer", None)  # keep no reference to it
    return ckpt


def encode(prompt, vocab_size):
    """The prompt's ids: its UTF-8 bytes after a document separator for a byte vocabulary, the
    given ids for any other one."""
    if vocab_size == 256:
        return [SEPARATOR, *prompt.encode("utf-8")]
    try:
        ids = [int(t) for t in prompt.split()]
    except ValueError:
        ids = None
    if not ids or not all(0 <= i < vocab_size for i in ids):
        sys.exit(
            f"{PROG}: error: this model's vocabulary has {vocab_size} ids, not 256 bytes: give "
            f"--prompt as token ids between 0 and {vocab_size - 1}, separated by spaces"
        )
    return ids


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    ckpt = load_weights(args.checkpoint)
    cfg = LlamaConfig(**ckpt["config"])
    with torch.device(device):  # built on the device: its only copy of the weights
        model = Llama(cfg)
    model.load_state_dict(ckpt["model"])  # saved unwrapped, so no DDP/compile key prefixes
    model.eval()

    prompt = encode(args.prompt, cfg.vocab_size)
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator=gen)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        # the prompt and its continuation, without the separator encode() put in front
        print(decode(row[1:] if cfg.vocab_size == 256 else row, cfg.vocab_size))


if __name__ == "__main__":
    main()
