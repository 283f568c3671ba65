"""Write toy token files train.pkl / val.pkl (and .npy / .bin if asked) for train.py, offline.

    python 06_llama_ddp/make_toy_data.py                      # this Python's stdlib sources
    python 06_llama_ddp/make_toy_data.py --input my_text.txt  # your own text file
    python 06_llama_ddp/make_toy_data.py --formats pkl npy bin

The tokenizer is the simplest there is: one token per UTF-8 byte (ids 0..255, byte 0 between
documents), which fits the vocabulary of every preset. Real runs use files tokenized with the
model's own tokenizer (for the 32k presets, Llama-2's SentencePiece vocabulary).
"""

import argparse
import pickle
import sys
import sysconfig
from pathlib import Path

import numpy as np

PROG = "make_toy_data.py"
LLMC_MAGIC = 20240520  # the header data.py recognises in .bin files (llm.c's format, version 1)


def stdlib_documents(max_bytes):
    """The .py files of this Python's standard library, in a fixed order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()[: max_bytes - total]
        docs.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return docs


def write(tokens, path):
    """Write one uint16 token stream in the format the suffix asks for."""
    if path.suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(tokens, f)
    elif path.suffix == ".npy":
        np.save(path, tokens)
    else:  # .bin with llm.c's header: 256 int32 (magic, version 1 = uint16, token count)
        header = np.zeros(256, dtype=np.int32)
        header[:3] = [LLMC_MAGIC, 1, len(tokens)]
        with open(path, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.tobytes())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="a UTF-8 text file (default: stdlib sources)")
    parser.add_argument("--out_dir", type=Path, default=Path("."), help="default: current folder")
    parser.add_argument("--formats", nargs="+", choices=["pkl", "npy", "bin"], default=["pkl"])
    parser.add_argument("--max_bytes", type=int, default=5_000_000, help="cap on the corpus size")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.max_bytes < 1:
        parser.error("--max_bytes must be at least 1")
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")

    if args.input is None:
        docs = stdlib_documents(args.max_bytes)
    elif args.input.is_file():
        docs = [args.input.read_bytes()[: args.max_bytes]]
    else:
        sys.exit(f"{PROG}: error: {args.input} is not a file; give a UTF-8 text file")
    tokens = np.frombuffer(b"\0".join(docs), dtype=np.uint8).astype(np.uint16)
    n_val = int(len(tokens) * args.val_fraction)
    if n_val < 2 or len(tokens) - n_val < 2:
        sys.exit(f"{PROG}: error: {len(tokens)} bytes of text are too few to split; give more")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, part in [("train", tokens[:-n_val]), ("val", tokens[-n_val:])]:
        for fmt in args.formats:
            path = args.out_dir / f"{split}.{fmt}"
            write(part, path)
            print(f"wrote {path}: {len(part):,} tokens")


if __name__ == "__main__":
    main()
