"""Turn text into the token files train.py reads: train.bin, val.bin (uint16) and meta.json.

Run it once, on a login node or laptop; training then needs neither the network nor tiktoken.

    python 05_gpt_ddp/prepare.py                       # Python's own stdlib sources, GPT-2 BPE
    python 05_gpt_ddp/prepare.py --tokenizer char      # same corpus, one token per byte, offline
    python 05_gpt_ddp/prepare.py --input my_texts/     # your own .txt/.md/.py files, all of them

The default corpus is the first 20 MB of the standard library of the Python running this script: it
exists on every machine, so the whole step works offline (with --tokenizer char, or a cached GPT-2
vocabulary). An --input is read whole unless --max_bytes caps it.

Any size of corpus: documents are read in pieces of about --chunk_bytes, tokenized on every core
(tiktoken releases the GIL) and appended to the files as they come, so memory stays near
2 x threads x chunk_bytes whatever the corpus size. Every document ends with a separator and gives
its last --val_fraction of tokens to val.bin. meta.json is written last: a run that stops early
leaves no meta.json, and train.py refuses a folder without one.
"""

import argparse
import codecs
import json
import os
import sys
import sysconfig
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = HERE / "data"  # train.py reads from the same default
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".tex", ".json", ".csv", ".html")
DEFAULT_CORPUS_BYTES = 20_000_000  # of the stdlib, when there is no --input
META_FORMAT = 2  # train.py refuses a meta.json without the token counts and max id it checks
PROG = "prepare.py"


def load_tokenizer(name, prog=PROG):
    """(encode, vocab_size, separator id, list of the bytes of every token) for 'gpt2' or 'char'.

    encode(text) gives a numpy array of ids and may run in several threads at once.
    char: one token per UTF-8 byte (vocabulary 256), byte 0 separates documents.
    gpt2: tiktoken's GPT-2 BPE (vocabulary 50257), <|endoftext|> separates documents.
    """
    if name == "char":
        return (
            lambda text: np.frombuffer(text.encode("utf-8"), np.uint8),
            256,
            0,
            [bytes([i]) for i in range(256)],
        )
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

    def encode(text):
        # the ids of encode_ordinary (special tokens in the text are plain text), but as a numpy
        # array straight from tiktoken's buffer: no Python list of ints, and the GIL is released
        return enc.encode_to_numpy(text, disallowed_special=())

    return encode, enc.n_vocab, enc.eot_token, token_bytes


def find_files(path):
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def safe_cut(text, start, end):
    """The last index start < i < end at which text[:i] and text[i:] tokenize as text does, or
    None.

    GPT-2's pre-tokenizer never puts a non-space character and a following whitespace into one
    piece, and BPE works within pieces. str.isspace() is true for every Unicode White_Space
    character, so `not isspace()` is non-space for tiktoken's regex too.
    """
    for mark in ("\n", " "):
        i = text.rfind(mark, start, end)
        while i > start and text[i - 1].isspace():
            i = text.rfind(mark, start, i)
        if i > start:
            return i
    return None


def read_document(path, byte_limit, chunk_bytes, counts):
    """Yield the text of one file in pieces of at most chunk_bytes characters, cut where the
    tokens do not change (safe_cut), reading at most byte_limit bytes. Invalid UTF-8 becomes
    U+FFFD, as bytes.decode(errors="replace") of the whole file would make it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(min(chunk_bytes, byte_limit))
            byte_limit -= len(raw)
            counts["read"] += len(raw)
            text += decoder.decode(raw, final=not raw)
            while len(text) >= chunk_bytes:
                # no safe cut in the last half (a very long line without spaces): cut anyway;
                # the tokens next to that one cut may then differ from the whole file's
                cut = safe_cut(text, chunk_bytes // 2, chunk_bytes) or chunk_bytes
                yield text[:cut]
                text = text[cut:]
            if not raw:
                break
    yield text


def pieces(files, max_bytes, chunk_bytes, counts):
    """(text, ends_a_document) for every piece of the corpus, in order. counts["documents"],
    counts["bytes"] (UTF-8 bytes of text used: the budget) and counts["read"] (bytes read from
    the files) grow as they are read."""
    for path in files:
        if counts["bytes"] >= max_bytes:
            break
        doc = read_document(path, max_bytes - counts["bytes"], chunk_bytes, counts)
        text, after = next(doc), next(doc, None)
        if after is None and not text.strip():
            continue  # a blank file (or a blank end of the byte budget) is no document
        counts["documents"] += 1
        while after is not None:
            counts["bytes"] += len(text.encode("utf-8"))
            yield text, False
            text, after = after, next(doc, None)
        counts["bytes"] += len(text.encode("utf-8"))
        yield text, True


def tasks(pieces, chunk_bytes):
    """Group small pieces into lists of about chunk_bytes characters: one task per list."""
    group, size = [], 0
    for piece in pieces:
        group.append(piece)
        size += len(piece[0])
        if size >= chunk_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


class SplitWriter:
    """Appends each document's ids, then its separator, to train.bin.tmp, and moves the last
    val_fraction of them to val.bin.tmp once the document's length is known."""

    def __init__(self, data_dir, separator, val_fraction):
        self.tmp = {split: data_dir / f"{split}.bin.tmp" for split in ("train", "val")}
        self.train = open(self.tmp["train"], "w+b")
        self.val = open(self.tmp["val"], "wb")
        self.separator = np.array([separator], np.uint16)
        self.val_fraction = val_fraction
        self.count = {"train": 0, "val": 0}
        self.max_id = separator
        self.held, self.spilled = [], 0  # this document: ids in memory, ids already in train

    def add(self, ids, ends_document):
        # uint16 holds ids below 65536: GPT-2's 50257 fit
        self.max_id = max(self.max_id, int(ids.max(initial=0)))
        self.held.append(ids.astype(np.uint16))
        if not ends_document:  # a long document: its start goes to train now
            self._write("train", np.concatenate(self.held))
            self.spilled += sum(map(len, self.held))
            self.held = []
            return
        self.held.append(self.separator)  # the separator lets the model learn where a text ends
        ids = np.concatenate(self.held)
        n_val = int((self.spilled + len(ids)) * self.val_fraction)
        # the end of every document goes to validation, so both splits hold the same kinds of
        # text (a split by whole files would validate on other modules than it trains on)
        if n_val > len(ids):
            self._move_train_tail_to_val(n_val - len(ids))
            n_val = len(ids)
        self._write("train", ids[: len(ids) - n_val])
        self._write("val", ids[len(ids) - n_val :])
        self.held, self.spilled = [], 0

    def _write(self, split, ids):
        (self.train if split == "train" else self.val).write(memoryview(ids))
        self.count[split] += len(ids)

    def _move_train_tail_to_val(self, n):
        """The last n ids written to train belong to val (a long document's end)."""
        start = (self.count["train"] - n) * 2
        self.train.seek(start)
        while block := self.train.read(1 << 24):
            self.val.write(block)
        self.train.truncate(start)
        self.train.seek(start)
        self.count["train"] -= n
        self.count["val"] += n

    def finish(self, data_dir, meta):
        """Make the files whole on disk, give them their names, and write meta.json last."""
        for f in (self.train, self.val):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for split, tmp in self.tmp.items():
            os.replace(tmp, data_dir / f"{split}.bin")
        write_atomically(data_dir / "meta.json", json.dumps(meta))

    def abandon(self):
        for f in (self.train, self.val):
            f.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


def write_atomically(path, text):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # the rename itself, on disk (Windows cannot open a folder)
        directory = os.open(path.parent, os.O_RDONLY)
        os.fsync(directory)
        os.close(directory)


class Progress:
    """A line on stderr every few seconds of a long run: share done, MB/s, time left."""

    def __init__(self, total_bytes, every=5.0):
        self.total, self.every = max(total_bytes, 1), every
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, done):
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / (now - self.start)
        left = (self.total - done) / rate if rate else 0
        line = (
            f"{PROG}: {done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB "
            f"({100 * done / self.total:.0f}%), {rate / 1e6:.1f} MB/s, "
            f"{int(left) // 60}:{int(left) % 60:02d} left"
        )
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", file=sys.stderr)

    def close(self):
        if self.tty and self.last > self.start:
            print(file=sys.stderr)  # end the \r line


def tokenize_corpus(files, args, encode, writer):
    """Tokenize every piece on args.threads threads, in order, with a bounded number in flight.
    Returns the counts of documents and bytes read."""
    counts = {"documents": 0, "bytes": 0, "read": 0}
    progress = Progress(min(args.max_bytes, args.available))
    in_flight = deque()

    def encode_all(group):
        return [(encode(text), ends) for text, ends in group]

    def take_oldest():
        for ids, ends in in_flight.popleft().result():
            writer.add(ids, ends)
        progress.update(counts["read"])

    with ThreadPoolExecutor(args.threads) as pool:
        for group in tasks(
            pieces(files, args.max_bytes, args.chunk_bytes, counts), args.chunk_bytes
        ):
            in_flight.append(pool.submit(encode_all, group))
            if len(in_flight) >= 2 * args.threads:  # enough to keep every thread busy
                take_oldest()
        while in_flight:
            take_oldest()
    progress.close()
    return counts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input",
        type=Path,
        help="a text file or a folder of text files (unset: this Python's standard library)",
    )
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="output folder")
    parser.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    parser.add_argument(
        "--max_bytes",
        type=int,
        help=f"use at most this much text (unset: all of --input, or {DEFAULT_CORPUS_BYTES:,} "
        "bytes of the standard library)",
    )
    parser.add_argument("--val_fraction", type=float, default=0.1, help="of every document")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=int, default=threads, help="tokenizer threads")
    parser.add_argument(
        "--chunk_bytes", type=int, default=1 << 20, help="text per tokenizer task (memory)"
    )
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes <= 0:
        parser.error("--max_bytes must be positive")
    if not 0 < args.val_fraction < 1:
        parser.error("--val_fraction must be between 0 and 1")
    if args.threads < 1 or args.chunk_bytes < 2:
        parser.error("--threads must be at least 1 and --chunk_bytes at least 2")
    return args


def no_text(source):
    sys.exit(f"{PROG}: error: no text found in {source} (suffixes read: {TEXT_SUFFIXES})")


def main(argv=None):
    args = parse_args(argv)
    source = args.input or Path(sysconfig.get_paths()["stdlib"])
    if not source.exists():
        sys.exit(f"{PROG}: error: --input {source} does not exist; give a text file or a folder")
    files = find_files(source)
    # the stdlib also holds test data in odd encodings: skip test folders for cleaner text
    if args.input is None:
        files = [p for p in files if p.suffix == ".py" and "test" not in p.parts]
        args.max_bytes = args.max_bytes or DEFAULT_CORPUS_BYTES
    args.available = sum(p.stat().st_size for p in files)
    if not args.available:  # checked again once read: files of blanks hold no documents either
        no_text(source)
    args.max_bytes = args.max_bytes or sys.maxsize  # all of --input
    encode, vocab_size, separator, token_bytes = load_tokenizer(args.tokenizer)

    args.data_dir.mkdir(parents=True, exist_ok=True)
    # from now on the folder holds no meta.json until it holds whole, matching token files
    (args.data_dir / "meta.json").unlink(missing_ok=True)
    writer = SplitWriter(args.data_dir, separator, args.val_fraction)
    try:
        counts = tokenize_corpus(files, args, encode, writer)
        if not counts["documents"]:
            no_text(source)
    except BaseException:  # an error or Ctrl-C: no .tmp files left behind
        writer.abandon()
        raise
    meta = {
        "format": META_FORMAT,
        "tokenizer": args.tokenizer,
        "vocab_size": vocab_size,
        "separator": separator,
        "dtype": "uint16",
        "source": str(source),
        "documents": counts["documents"],
        "bytes_read": counts["read"],
        # train.py checks the files' sizes and the ids against these, without reading the files
        "train_tokens": writer.count["train"],
        "val_tokens": writer.count["val"],
        "max_id": writer.max_id,
        # lets train.py print samples without tiktoken
        "token_bytes": [b.hex() for b in token_bytes],
    }
    writer.finish(args.data_dir, meta)
    if counts["read"] == args.available:
        used = f"all {args.available:,} bytes"
    else:
        used = f"{counts['read']:,} of {args.available:,} bytes (--max_bytes {args.max_bytes:,})"
    print(
        f"{counts['documents']:,} document{'s' * (counts['documents'] != 1)}, {used} in {source}: "
        f"{meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
        f"({args.tokenizer}, vocabulary {vocab_size}) -> {args.data_dir}"
    )


if __name__ == "__main__":
    main()
