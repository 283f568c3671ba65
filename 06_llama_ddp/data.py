"""Token files, and the DistributedDataLoader that gives each rank its own slice of a token stream.

Accepted files, each one stream of token ids:
  .pkl  a pickled list or 1-D numpy array of ids, or a list of such sequences, read with a
        restricted unpickler (see TokenUnpickler) -- never with plain pickle.load. A list of
        documents is joined as it is: nothing goes between them, since no id is a separator in
        every vocabulary; end each document with your tokenizer's end-of-text id yourself
        (make_toy_data.py puts byte 0 between documents). Loaded whole, on every rank;
  .npy  a 1-D integer array (np.save), memory-mapped, read with allow_pickle=False;
  .bin  raw uint16 (the default, as nanoGPT writes them) or uint32 ids (--bin_dtype), memory-mapped;
        a file that starts with llm.c's header (256 int32: magic 20240520, version, token count)
        records its own dtype: version 1 = uint16, version 2 = uint32.
Memory-mapped files are never read whole: the ranks of a node share their pages in the OS's
cache, and their ids are checked as the loader draws them (a scan of every id would cost every
rank a pass over the corpus at start-up).
"""

import pickle
from pathlib import Path

import numpy as np
import torch

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4
LLMC_DTYPES = {1: np.uint16, 2: np.uint32}
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenFileError(ValueError):
    """A token file that cannot be used; the message is one line meant for the user."""


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something other than lists, ints and numpy integer arrays."""


INTEGER_CODES = {"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"}


class _DType:
    """Stands in for numpy.dtype while a pickle is loaded: integers only, checked state."""

    def __init__(self, code):
        if code not in INTEGER_CODES:
            raise RefusedPickle(
                f"it holds an array of numpy type {code!r}; token ids must be integers"
            )
        self.code = code
        self.dtype = None  # set by __setstate__; _array_from_bytes refuses it if not

    def __setstate__(self, state):
        # a plain integer dtype's state: (3, byte order, then six fields other dtypes fill in)
        version, byte_order, *rest = state
        plain = version == 3 and rest == [None, None, None, -1, -1, 0]
        if not plain or byte_order not in ("<", ">", "|", "="):
            raise RefusedPickle("it holds a dtype that is not a plain integer type")
        self.dtype = np.dtype(byte_order + self.code)


def _array_from_bytes(raw, dtype, shape):
    """A 1-D array over raw bytes, after checking that they are exactly what shape promises."""
    if not isinstance(dtype, _DType) or dtype.dtype is None:
        raise RefusedPickle("it holds an array in an unexpected layout")
    if not isinstance(raw, (bytes, bytearray)):
        raise RefusedPickle("it holds an array in an unexpected layout")
    if len(shape) != 1 or shape[0] * dtype.dtype.itemsize != len(raw):
        raise RefusedPickle(f"it holds an array of shape {shape}; token ids must be 1-D")
    # no copy: a pickle can hand the same bytes to many arrays, and copies would multiply them
    return np.frombuffer(raw, dtype=dtype.dtype)


class _Array:
    """Stands in for numpy.ndarray: made empty, then filled by __setstate__ from the pickle."""

    def __init__(self):
        self.array = None  # _one_sequence refuses an array that was never filled

    def __setstate__(self, state):
        version, shape, dtype, fortran_order, raw = state
        self.array = _array_from_bytes(raw, dtype, shape)


class TokenUnpickler(pickle.Unpickler):
    """An unpickler that can build lists, tuples, ints and numpy integer arrays, and nothing else.

    A pickle is a small program: it names functions (any importable one: os.system, builtins.exec,
    subprocess.Popen, ...) and calls them with arguments of its choosing while it is being loaded.
    pickle.load on a file from the internet therefore runs that file's code. Every function a pickle
    names goes through find_class. Here find_class refuses every name except the few a pickled
    numpy integer array uses, and even those are not numpy's own functions: numpy's rebuild
    functions trust their input, and a damaged or crafted pickle can crash them (fuzzing this file
    found a segmentation fault). Each name maps instead to a small method below that checks its
    arguments and calls np.frombuffer. The names differ between numpy 1.x (numpy.core) and 2.x
    (numpy._core); protocol 5 pickles use _frombuffer, protocol 2 pickles use _codecs.encode.

    Nothing a pickle does may outlive its load: find_class returns a new function each time, never
    a method or class itself, because the pickle's BUILD instruction sets attributes on whatever
    find_class returned (even a function's __defaults__): on a shared builder, a crafted train.pkl
    could change how val.pkl is read afterwards. The new function cannot be instantiated either
    (NEWOBJ), so every array is made by make_array and filled by its own checked __setstate__.
    Nor may a small file ask for much memory: see latin1_encode and _read_pickle.
    """

    # the names a pickled numpy integer array uses, and the method that stands in for each
    BUILDERS = {
        ("numpy", "dtype"): "make_dtype",
        ("numpy", "ndarray"): "make_array",
        ("numpy.core.multiarray", "_reconstruct"): "make_array",
        ("numpy._core.multiarray", "_reconstruct"): "make_array",
        ("numpy.core.multiarray", "scalar"): "make_scalar",
        ("numpy._core.multiarray", "scalar"): "make_scalar",
        ("numpy.core.numeric", "_frombuffer"): "frombuffer",
        ("numpy._core.numeric", "_frombuffer"): "frombuffer",
        ("_codecs", "encode"): "latin1_encode",
    }

    def __init__(self, file, file_size):
        super().__init__(file)
        self.bytes_left = file_size  # what latin1_encode may still make in this load

    def find_class(self, module, name):
        if (module, name) not in self.BUILDERS:
            wanted = f"{module}.{name}"
            if not wanted.isprintable():  # keep the error message on one line
                wanted = ascii(wanted)
            raise RefusedPickle(
                f"it wants to call {wanted}; only lists, ints and numpy integer arrays are allowed"
            )
        builder = getattr(self, self.BUILDERS[module, name])
        return lambda *args: builder(*args)  # new each time: see the class docstring

    def make_dtype(self, code, align=False, copy=True):
        return _DType(code)

    def make_array(self, *args):
        """numpy.ndarray and _reconstruct: an empty array, which the pickle then fills."""
        return _Array()

    def make_scalar(self, dtype, raw):
        """numpy.int64(5) and friends, as a plain int."""
        return int(_array_from_bytes(raw, dtype, (1,))[0])

    def frombuffer(self, buf, dtype, shape, order):
        """How pickle protocol 5 stores an array: its bytes, dtype and shape."""
        array = _Array()
        array.array = _array_from_bytes(buf, dtype, shape)
        return array

    def latin1_encode(self, text, encoding):
        """_codecs.encode as protocol-2 pickles use it: to turn a str back into an array's bytes."""
        if encoding != "latin1" or not isinstance(text, str):
            raise RefusedPickle(f"it wants to encode text as {encoding!r}")
        # a pickle can encode one stored text again and again, a new copy each time; an honest
        # one encodes each text once, so all of them together fit in the file
        self.bytes_left -= len(text)
        if self.bytes_left < 0:
            raise RefusedPickle("it makes more bytes of array data than the file holds")
        return text.encode("latin1")


def _one_sequence(seq, path):
    """The list, tuple or checked array that holds one sequence's ids; its items come later."""
    if isinstance(seq, _Array):
        seq = seq.array  # 1-D and integer (_array_from_bytes), or None if never filled
    if not isinstance(seq, (list, tuple, np.ndarray)):
        raise TokenFileError(
            f"{path}: expected a list or 1-D array of integer token ids, or a list of them"
        )
    return seq


def _as_ids(seq, path):
    """One sequence as a 1-D integer array."""
    if isinstance(seq, np.ndarray):
        return seq
    # ints only: np.array of a list of lists would allocate rows x columns before any check
    if set(map(type, seq)) <= {int}:
        try:
            return np.array(seq, dtype=np.int64)
        except OverflowError:  # an int beyond 64 bits
            pass
    raise TokenFileError(
        f"{path}: expected a list or 1-D array of integer token ids, or a list of them"
    )


def _read_pickle(path):
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            obj = TokenUnpickler(f, size).load()
    except RefusedPickle as e:
        raise TokenFileError(f"{path}: refusing to load this pickle: {e}") from None
    except Exception as e:  # a damaged file fails in many ways; none of them ran foreign code
        raise TokenFileError(f"{path}: not a readable pickle of token ids ({e!r})") from None
    # a list whose items are sequences is a list of documents; anything else is one sequence
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (list, tuple, _Array)):
        docs = [_one_sequence(seq, path) for seq in obj]
    else:
        docs = [_one_sequence(obj, path)]
    # A pickle can refer to one list again and again: 50,000 references to a list of 200,000 ids
    # take 1 MB and would be 80 GB of int64. An honest file spends at least a byte on every id (a
    # uint8 array; a pickled int takes two or more), so the ids are counted before they are read.
    n_ids = sum(map(len, docs))
    if n_ids > size:
        raise TokenFileError(
            f"{path}: refusing to load this pickle: it holds {n_ids:,} token ids in {size:,} bytes "
            "(it refers to the same sequence many times)"
        )
    parts = [_as_ids(seq, path) for seq in docs]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _read_npy(path):
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TokenFileError(f"{path}: not a readable .npy array of token ids ({e})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TokenFileError(
            f"{path}: holds a {ids.ndim}-D array of {ids.dtype}; "
            "token ids must be a 1-D integer array"
        )
    return ids


def _read_bin(path, bin_dtype):
    size = path.stat().st_size
    header = np.fromfile(path, dtype=np.int32, count=3) if size >= LLMC_HEADER_BYTES else []
    if len(header) == 3 and header[0] == LLMC_MAGIC:
        version, count = int(header[1]), int(header[2])
        if version not in LLMC_DTYPES:
            raise TokenFileError(f"{path}: llm.c header with unknown version {version}")
        dtype = np.dtype(LLMC_DTYPES[version])
        if bin_dtype is not None and np.dtype(BIN_DTYPES[bin_dtype]) != dtype:
            raise TokenFileError(f"{path}: its header says {dtype}, but --bin_dtype is {bin_dtype}")
        if size != LLMC_HEADER_BYTES + count * dtype.itemsize:
            raise TokenFileError(f"{path}: header promises {count} tokens, file size disagrees")
        offset = LLMC_HEADER_BYTES
    else:
        dtype = np.dtype(BIN_DTYPES[bin_dtype or "uint16"])
        if size % dtype.itemsize:
            raise TokenFileError(
                f"{path}: {size} bytes is not a whole number of {dtype} tokens; wrong --bin_dtype?"
            )
        count, offset = size // dtype.itemsize, 0
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def outside_vocabulary(name, bad, vocab_size):
    if bad < 0:
        hint = "ids cannot be negative"
    else:
        hint = f"tokenize for this vocabulary, or pass --vocab_size {bad + 1} or more"
    return TokenFileError(
        f"{name}: token id {bad} is outside the model's vocabulary of {vocab_size} "
        f"(ids 0..{vocab_size - 1}); {hint}"
    )


def check_ids(ids, vocab_size, name):
    """Raise TokenFileError if an id is not a row of the embedding table."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise outside_vocabulary(name, low if low < 0 else high, vocab_size)


def load_tokens(path, vocab_size, bin_dtype=None):
    """Read a token file into a 1-D integer array (memory-mapped for .npy and .bin). A .pkl,
    loaded whole anyway, has every id checked against the vocabulary here; a memory-mapped file
    is checked batch by batch by the DistributedDataLoader. Raises TokenFileError with a one-line
    message."""
    path = Path(path)
    readers = {".pkl": _read_pickle, ".npy": _read_npy, ".bin": lambda p: _read_bin(p, bin_dtype)}
    if path.suffix not in readers:
        raise TokenFileError(f"{path}: unknown file type; use .pkl, .npy or .bin")
    if not path.is_file():
        raise TokenFileError(f"{path}: no such file (make one with 06_llama_ddp/make_toy_data.py)")
    ids = readers[path.suffix](path)
    if len(ids) == 0:
        raise TokenFileError(f"{path}: holds no tokens")
    if not isinstance(ids, np.memmap):
        check_ids(ids, vocab_size, path)
    return ids


class DistributedDataLoader:
    """Rank `rank` of `world_size` reads its own windows of one long token stream.

    Step k of a pass gives the world_size ranks consecutive windows of B*T input tokens, rank r the
    r-th, starting at token (k * world_size + r) * B * T. Each window is read with one extra token,
    the target of its last input. So in one pass the inputs of all ranks are disjoint and cover the
    stream, except its last tokens: fewer than world_size * B * T + 1 of them are skipped, and the
    next pass starts again at token 0.

    The position is one number, the batches taken so far, the same on every rank: saving it in
    the checkpoint and loading it back continues with exactly the batches an uninterrupted run
    would see. With vocab_size, every window's ids are checked as it is drawn (TokenFileError).
    """

    def __init__(
        self, tokens, batch_size, seq_len, rank, world_size, name="the stream", vocab_size=None
    ):
        self.tokens = tokens
        self.name = name
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        window = batch_size * seq_len
        self.steps_per_pass = (len(tokens) - 1) // (world_size * window)
        if self.steps_per_pass == 0:
            raise TokenFileError(
                f"{name}: {len(tokens)} tokens are fewer than one window per rank "
                f"(world_size {world_size} x batch_size {batch_size} x seq_len {seq_len} + 1 = "
                f"{world_size * window + 1}); use more data or a smaller batch_size or seq_len"
            )
        self.batches_taken = 0

    def next_batch(self):
        """Inputs x and targets y (x shifted by one token), both (batch_size, seq_len) int64."""
        window = self.batch_size * self.seq_len
        step = self.batches_taken % self.steps_per_pass
        start = (step * self.world_size + self.rank) * window
        ids = self.tokens[start : start + window + 1].astype(np.int64)
        if self.vocab_size is not None:  # a few thousand ids: nothing next to a training step
            check_ids(ids, self.vocab_size, self.name)
        chunk = torch.from_numpy(ids)
        self.batches_taken += 1
        x = chunk[:-1].view(self.batch_size, self.seq_len)
        y = chunk[1:].view(self.batch_size, self.seq_len)
        return x, y

    def state_dict(self):
        return {"batches_taken": self.batches_taken}

    def load_state_dict(self, state):
        self.batches_taken = int(state["batches_taken"])
