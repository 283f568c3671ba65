"""Write toy token files train.pkl / val.pkl (and .npy / .bin if asked) for train.py, offline.

    python 06_llama_ddp/make_toy_data.py                      # 5 MB of this Python's stdlib
    python 06_llama_ddp/make_toy_data.py --input my_texts/    # your own text file or folder
    python 06_llama_ddp/make_toy_data.py --formats pkl npy bin

The tokenizer is the simplest there is: one token per byte (ids 0..255, byte 0 between
documents), which fits the vocabulary of every preset. The files are one stream of all documents;
validation is its last --val_fraction. Real runs use files tokenized with the model's own
tokenizer (for the 32k presets, Llama-2's SentencePiece vocabulary).

Any size of corpus: the bytes are copied to the files a block at a time, so memory stays small,
except for .pkl, which is built (and later loaded by train.py) whole: use .bin or .npy for corpora
that are large next to RAM (see docs/llama.md).
"""

import argparse
import io
import os
import pickle
import sys
import sysconfig
from pathlib import Path

import numpy as np

PROG = "make_toy_data.py"
LLMC_MAGIC = 20240520  # the header data.py recognises in .bin files (llm.c's format, version 1)
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".tex", ".json", ".csv", ".html")  # as 05's
DEFAULT_CORPUS_BYTES = 5_000_000  # of the stdlib, when there is no --input
BLOCK = 1 << 22  # bytes copied at a time


def documents(paths, max_bytes):
    """(path, bytes to read) for each file in a fixed order, until max_bytes are taken."""
    docs, total = [], 0
    for path in paths:
        n = min(path.stat().st_size, max_bytes - total)
        docs.append((path, n))
        total += n
        if total >= max_bytes:
            break
    return docs


def token_blocks(docs):
    """The token stream, uint16 ids a block at a time: each file's bytes, byte 0 between files."""
    separator = np.zeros(1, np.uint16)
    for i, (path, n) in enumerate(docs):
        if i:
            yield separator
        with open(path, "rb") as f:
            while n > 0:
                raw = f.read(min(BLOCK, n))
                if not raw:
                    sys.exit(f"{PROG}: error: {path} became shorter while it was read")
                n -= len(raw)
                yield np.frombuffer(raw, np.uint8).astype(np.uint16)


def header(fmt, n_tokens):
    """The bytes before the ids: llm.c's header for .bin (256 int32: magic, version 1 = uint16,
    token count), numpy's for .npy; a .pkl has none (it is written whole at the end)."""
    if fmt == "bin":
        llmc = np.zeros(256, dtype=np.int32)
        llmc[:3] = [LLMC_MAGIC, 1, n_tokens]
        return llmc.tobytes()
    if fmt == "npy":
        return npy_header(n_tokens)
    return b""


def npy_header(n_tokens):
    buffer = io.BytesIO()
    layout = {"descr": np.dtype(np.uint16).str, "fortran_order": False, "shape": (n_tokens,)}
    np.lib.format.write_array_header_1_0(buffer, layout)
    return buffer.getvalue()


def write_splits(docs, n_train, n_total, out_dir, formats):
    """Stream the tokens into every format of both splits, each through a .tmp file."""
    sizes = {"train": n_train, "val": n_total - n_train}
    paths = {(s, f): out_dir / f"{s}.{f}" for s in sizes for f in formats}
    files = {key: open(path.with_name(path.name + ".tmp"), "wb") for key, path in paths.items()}
    for (split, fmt), f in files.items():
        f.write(header(fmt, sizes[split]))
    position = 0
    for block in token_blocks(docs):
        for split, start, end in (("train", 0, n_train), ("val", n_train, n_total)):
            part = block[max(start - position, 0) : max(end - position, 0)]
            for fmt in formats:
                files[split, fmt].write(memoryview(part))
        position += len(block)
    for (split, fmt), f in files.items():
        if fmt == "pkl":  # the ids written so far, pickled as one array: the file's real content
            f.close()
            tokens = np.fromfile(f.name, dtype=np.uint16)
            f = open(f.name, "wb")
            pickle.dump(tokens, f)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(f.name, paths[split, fmt])
        print(f"wrote {paths[split, fmt]}: {sizes[split]:,} tokens")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input", type=Path, help="a text file or a folder of them (unset: stdlib sources)"
    )
    parser.add_argument("--out_dir", type=Path, default=Path("."), help="default: current folder")
    parser.add_argument("--formats", nargs="+", choices=["pkl", "npy", "bin"], default=["pkl"])
    parser.add_argument(
        "--max_bytes",
        type=int,
        help=f"use at most this much text (unset: all of --input, or {DEFAULT_CORPUS_BYTES:,} "
        "bytes of the standard library)",
    )
    parser.add_argument("--val_fraction", type=float, default=0.1, help="of the whole stream")
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes < 1:
        parser.error("--max_bytes must be at least 1")
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")

    if args.input is None:
        paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        max_bytes = args.max_bytes or DEFAULT_CORPUS_BYTES
    elif args.input.is_file():
        paths, max_bytes = [args.input], args.max_bytes or sys.maxsize
    elif args.input.is_dir():
        paths = sorted(
            p for p in args.input.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
        )
        max_bytes = args.max_bytes or sys.maxsize
    else:
        sys.exit(
            f"{PROG}: error: --input {args.input} does not exist; give a text file or a folder"
        )
    docs = documents(paths, max_bytes)
    n_total = sum(n for _, n in docs) + max(len(docs) - 1, 0)  # the separators between them
    n_val = int(n_total * args.val_fraction)
    if n_val < 2 or n_total - n_val < 2:
        sys.exit(f"{PROG}: error: {n_total} bytes of text are too few to split; give more")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_splits(docs, n_total - n_val, n_total, args.out_dir, args.formats)


if __name__ == "__main__":
    main()
