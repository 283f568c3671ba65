"""Turn text into the token files train.py reads: train.bin, val.bin (uint16) and meta.json.

Run it once, on a login node or laptop; training then needs neither the network nor tiktoken.

    python 05_gpt_ddp/prepare.py                       # Python's own stdlib sources, GPT-2 BPE
    python 05_gpt_ddp/prepare.py --tokenizer char      # same corpus, one token per byte, offline
    python 05_gpt_ddp/prepare.py --input my_texts/     # your own .txt/.md/.py files

The default corpus is the standard library of the Python running this script: it exists on every
machine, so the whole step works offline (with --tokenizer char, or a cached GPT-2 vocabulary).
"""

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "data"  # train.py reads from the same default
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".tex", ".json", ".csv", ".html")
PROG = "prepare.py"


def load_tokenizer(name, prog=PROG):
    """(encode, vocab_size, separator id, list of the bytes of every token) for 'gpt2' or 'char'.

    char: one token per UTF-8 byte (vocabulary 256), byte 0 separates documents.
    gpt2: tiktoken's GPT-2 BPE (vocabulary 50257), <|endoftext|> separates documents.
    """
    if name == "char":
        return (lambda text: list(text.encode("utf-8"))), 256, 0, [bytes([i]) for i in range(256)]
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache: requests/urllib errors of many kinds
        sys.exit(
            f"{prog}: error: cannot load tiktoken's GPT-2 vocabulary ({type(e).__name__}); it is "
            "downloaded on first use, so run once with network access and point "
            "TIKTOKEN_CACHE_DIR=<folder> at the cache it fills (copy that folder to offline "
            "machines), or use --tokenizer char, which needs no download"
        )
    token_bytes = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    return enc.encode_ordinary, enc.n_vocab, enc.eot_token, token_bytes


def find_files(path):
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def read_documents(paths, max_bytes):
    """Read text files in a fixed order until max_bytes of text are collected."""
    docs, total = [], 0
    for p in paths:
        text = p.read_bytes()[: max_bytes - total].decode("utf-8", errors="replace")
        if text.strip():
            docs.append(text)
            total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return docs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        type=Path,
        help="a text file or a folder of text files (default: this Python's standard library)",
    )
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    parser.add_argument("--max_bytes", type=int, default=20_000_000, help="cap on corpus size")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.max_bytes <= 0:
        parser.error("--max_bytes must be positive")
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    source = args.input or Path(sysconfig.get_paths()["stdlib"])
    if not source.exists():
        sys.exit(f"{PROG}: error: --input {source} does not exist; give a text file or a folder")
    files = find_files(source)
    # the stdlib also holds test data in odd encodings: skip test folders for cleaner text
    if args.input is None:
        files = [p for p in files if p.suffix == ".py" and "test" not in p.parts]
    docs = read_documents(files, args.max_bytes)
    if not docs:
        sys.exit(f"{PROG}: error: no text found in {source} (suffixes read: {TEXT_SUFFIXES})")

    encode, vocab_size, separator, token_bytes = load_tokenizer(args.tokenizer)
    train_ids, val_ids = [], []
    for doc in docs:
        ids = encode(doc) + [separator]  # the separator lets the model learn where a text ends
        # the end of every document goes to validation, so both splits hold the same kinds of
        # text (a split by whole files would validate on other modules than it trains on)
        cut = len(ids) - int(len(ids) * args.val_fraction)
        train_ids += ids[:cut]
        val_ids += ids[cut:]
    # uint16 holds ids below 65536: GPT-2's 50257 fit
    splits = {"train": np.array(train_ids, np.uint16), "val": np.array(val_ids, np.uint16)}

    args.data_dir.mkdir(parents=True, exist_ok=True)
    for split, data in splits.items():
        tmp = args.data_dir / f"{split}.bin.tmp"
        data.tofile(tmp)
        os.replace(tmp, args.data_dir / f"{split}.bin")
    meta = {
        "tokenizer": args.tokenizer,
        "vocab_size": vocab_size,
        "separator": separator,
        "source": str(source),
        "documents": len(docs),
        "train_tokens": len(splits["train"]),
        "val_tokens": len(splits["val"]),
        # lets train.py print samples without tiktoken
        "token_bytes": [b.hex() for b in token_bytes],
    }
    (args.data_dir / "meta.json").write_text(json.dumps(meta))
    print(
        f"{len(docs)} documents from {source}: {meta['train_tokens']:,} train and "
        f"{meta['val_tokens']:,} val tokens ({args.tokenizer}, vocabulary {vocab_size}) "
        f"-> {args.data_dir}"
    )


if __name__ == "__main__":
    main()
