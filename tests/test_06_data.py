"""Step 06 data: the DistributedDataLoader's sharding and resume, the token-file readers (.pkl
through a restricted unpickler, .npy, .bin) and their errors, and make_toy_data.py."""

import builtins
import inspect
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from helpers import PYTHON, import_step, load_script, run, script

D = load_script("06_llama_ddp/data.py", "llama_data")


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_one_pass_over_all_ranks_is_disjoint_and_covers_the_stream(world_size):
    B, T, N = 2, 5, 257  # token i has value i, so a batch shows which positions it read
    tokens = np.arange(N)
    loaders = [D.DistributedDataLoader(tokens, B, T, r, world_size) for r in range(world_size)]
    steps = loaders[0].steps_per_pass
    assert steps == (N - 1) // (world_size * B * T)
    seen = []
    for loader in loaders:
        for x, y in take(loader, steps):
            assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
            torch.testing.assert_close(y, x + 1)  # targets are the inputs shifted by one token
            seen.extend(x.flatten().tolist())
    # disjoint (no position twice) and covering everything but a remainder < one step's windows
    assert sorted(seen) == list(range(steps * world_size * B * T))
    assert N - len(seen) < world_size * B * T + 1
    # the next pass starts again from the beginning, on every rank
    for rank, loader in enumerate(loaders):
        x, _ = loader.next_batch()
        assert x[0, 0] == rank * B * T


def test_resuming_from_a_saved_position_gives_the_batches_of_an_uninterrupted_run(tmp_path):
    tokens = np.arange(1000)
    uninterrupted = take(D.DistributedDataLoader(tokens, 4, 8, rank=1, world_size=2), 20)
    first = D.DistributedDataLoader(tokens, 4, 8, rank=1, world_size=2)
    take(first, 13)  # crosses the end of the stream (7 steps per pass) once
    torch.save({"loader": first.state_dict()}, tmp_path / "ckpt.pt")
    resumed = D.DistributedDataLoader(tokens, 4, 8, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"])
    for (x, y), (x_ref, y_ref) in zip(take(resumed, 7), uninterrupted[13:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


class RunsShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class RunsPython:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


@pytest.mark.parametrize(
    "make_payload, called",
    [
        (lambda marker: RunsShellCommand(f"touch {marker}"), "posix.system"),
        (lambda marker: RunsPython(f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        # hidden inside an otherwise valid list of documents
        (lambda marker: [np.arange(5), RunsShellCommand(f"touch {marker}")], "posix.system"),
    ],
)
def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, make_payload, called):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(make_payload(marker)))
    with pytest.raises(D.TokenFileError) as error:
        D.load_tokens(evil, vocab_size=256)
    assert str(error.value) == (
        f"{evil}: refusing to load this pickle: it wants to call {called}; "
        "only lists, ints and numpy integer arrays are allowed"
    )
    assert not marker.exists()
    # the payload is real: plain pickle.load would have run it
    pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps(np.array([1, 2, 3], dtype=object)))
    with pytest.raises(
        D.TokenFileError,
        match="refusing to load this pickle: it holds an array of numpy type 'O8'; token ids must",
    ):
        D.load_tokens(path, vocab_size=256)


class TamperedDType:
    """Pickles as numpy.dtype("u2") with a forged state (a huge item size): numpy's own
    dtype.__setstate__ accepts such states and can then crash the process."""

    def __reduce__(self):
        return (np.dtype, ("u2", False, True), (3, "<", None, None, None, 1313783567, -1, 0))


def test_a_forged_dtype_state_is_refused(tmp_path):
    path = tmp_path / "forged.pkl"
    path.write_bytes(pickle.dumps([TamperedDType()]))
    with pytest.raises(D.TokenFileError, match="it holds a dtype that is not a plain integer type"):
        D.load_tokens(path, vocab_size=256)


def test_newobj_on_the_ndarray_name_is_refused_in_one_line(tmp_path):
    """NEWOBJ makes an object of the class find_class returned without calling __init__: for
    numpy.ndarray that was an empty stand-in array, and an AttributeError traceback."""
    newobj = b"cnumpy\nndarray\n)\x81"  # GLOBAL numpy.ndarray, EMPTY_TUPLE, NEWOBJ
    files = {
        "alone.pkl": b"\x80\x02" + newobj + b".",
        # [[1, 2], <newobj>]: EMPTY_LIST, MARK, EMPTY_LIST, MARK, 1, 2, APPENDS, ..., APPENDS
        "second.pkl": b"\x80\x02](](K\x01K\x02e" + newobj + b"e.",
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(D.TokenFileError) as error:
            D.load_tokens(path, vocab_size=256)
        assert str(error.value).startswith(f"{path}: not a readable pickle of token ids (")
        assert "\n" not in str(error.value)


# Loads that may go wrong run in a child process under a memory limit: a pickle that gets past the
# checks can ask for tens of gigabytes, which must fail a test, not bring in the OOM killer.
MEMORY_LIMIT = """
import os, resource, sys, types
import numpy as np
# data.py needs torch only for DistributedDataLoader: a stand-in saves seconds of import
sys.modules["torch"] = types.ModuleType("torch")
sys.path.insert(0, "06_llama_ddp")
import data as D
# allow 256 MiB more than the process uses now
in_use = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (in_use + (1 << 28), in_use + (1 << 28)))
"""
LOAD_ONE = """
try:
    D.load_tokens(sys.argv[1], vocab_size=1 << 20)
except D.TokenFileError as e:
    print(e)
"""


def repeated_call(function, args, times):
    """A pickle of a list of `times` results of function(*args), with the function and its
    arguments stored once, in the pickle's memo, and each call referring back to them."""
    return (
        b"\x80\x03" + function + b"q\x640"  # the function, remembered as 100 (BINPUT), POP
        + b"(" + args + b"tq\x650"  # MARK, the arguments, TUPLE, remembered as 101, POP
        + b"](" + b"h\x64h\x65R" * times + b"e."  # a list of calls: BINGET 100, BINGET 101, REDUCE
    )  # fmt: skip


def memo_bombs():
    """{name: (pickle, the error it must give)}. Each is under 1 MB; without a bound on what the
    memo multiplies, it asks for 30 to 80 GB."""
    ids = list(range(200_000))
    text, raw = b"a" * 500_000, bytes(500_000)
    # (text, "latin1"): two BINUNICODE
    encode_args = b"X" + struct.pack("<I", len(text)) + text + b"X\x06\x00\x00\x00latin1"
    u1 = pickle.dumps(np.dtype("u1"), protocol=2)[2:-1]  # its opcodes, without PROTO and STOP
    shape = b"J" + struct.pack("<i", len(raw)) + b"\x85"  # BININT, TUPLE1
    frombuffer_args = (  # (bytearray (BYTEARRAY8), dtype, shape, "C")
        b"\x96" + struct.pack("<Q", len(raw)) + raw + u1 + shape + b"X\x01\x00\x00\x00C"
    )
    refused = "refusing to load this pickle: it"
    return {
        # one list of 200,000 ids, referred to 50,000 times, as documents or as rows of one
        "documents": (
            pickle.dumps([ids] * 50_000, protocol=2),
            f"{refused} holds 10,000,000,000 token ids in 969,179 bytes",
        ),
        "rows": (
            pickle.dumps([[ids] * 50_000], protocol=2),
            "expected a list or 1-D array of integer token ids, or a list of them",
        ),
        # _codecs.encode(text, "latin1") 60,000 times on one 500 kB text (BINUNICODE)
        "encode": (
            repeated_call(b"c_codecs\nencode\n", encode_args, 60_000),
            f"{refused} makes more bytes of array data than the file holds",
        ),
        # _frombuffer(bytearray, uint8, shape, "C") 90,000 times on one 500 kB bytearray
        "frombuffer": (
            repeated_call(b"cnumpy._core.numeric\n_frombuffer\n", frombuffer_args, 90_000),
            f"{refused} holds 45,000,000,000 token ids in 950,130 bytes",
        ),
    }


@pytest.mark.parametrize("name", ["documents", "rows", "encode", "frombuffer"])
def test_a_memo_bomb_is_refused_before_it_allocates(tmp_path, name):
    content, message = memo_bombs()[name]
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(content)
    result = run([PYTHON, "-c", MEMORY_LIMIT + LOAD_ONE, path], timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert result.stdout.startswith(f"{path}: {message}") and result.stdout.count("\n") == 1


def builder_state():
    """What a pickle's BUILD instruction could change in data.py: the attributes and defaults of
    every function, and every class's namespace and the functions in it."""

    def function_state(f):
        return dict(vars(f)), f.__defaults__, f.__kwdefaults__

    state = {}
    for name, obj in vars(D).items():
        if inspect.isfunction(obj):
            state[name] = function_state(obj)
        elif inspect.isclass(obj) and obj.__module__ == D.__name__:
            state[name] = dict(vars(obj))
            for key, member in vars(obj).items():
                if inspect.isfunction(member):
                    state[f"{name}.{key}"] = function_state(member)
    return state


@pytest.mark.parametrize(
    "content",
    [
        # BUILD with a dict state on the _codecs.encode stand-in: sets its attribute foo = 7
        b"c_codecs\nencode\n}U\x03fooK\x07sb.",
        # BUILD with a slot state (None, {"__defaults__": (1, 2, 3, 4)}) on the _frombuffer one
        b"cnumpy._core.numeric\n_frombuffer\n(N}U\x0c__defaults__(K\x01K\x02K\x03K\x04tstb.",
    ],
    ids=["dict-state", "slot-state"],
)
def test_build_on_an_allowed_name_leaves_no_trace(tmp_path, content):
    path = tmp_path / "build.pkl"
    path.write_bytes(content)
    before = builder_state()
    with pytest.raises(D.TokenFileError, match="expected a list or 1-D array of integer token"):
        D.load_tokens(path, vocab_size=256)
    assert builder_state() == before


def test_a_crafted_train_pkl_cannot_change_how_val_pkl_is_read(tmp_path):
    # val.pkl calls _frombuffer() without arguments: refused, as arguments are missing
    val = tmp_path / "val.pkl"
    val.write_bytes(b"\x80\x03cnumpy._core.numeric\n_frombuffer\n)R.")
    with pytest.raises(D.TokenFileError) as refused:
        D.load_tokens(val, vocab_size=256)
    # train.pkl gives _frombuffer default arguments that make the ids [7, 8] (slot state BUILD)
    u2 = pickle.dumps(np.dtype("<u2"), protocol=2)[2:-1]  # its opcodes, without PROTO and STOP
    defaults = b"(C\x04\x07\x00\x08\x00" + u2 + b"K\x02\x85X\x01\x00\x00\x00Ct"
    train = tmp_path / "train.pkl"
    train.write_bytes(
        b"\x80\x03cnumpy._core.numeric\n_frombuffer\n(N}U\x0c__defaults__" + defaults + b"stb."
    )
    with pytest.raises(D.TokenFileError):
        D.load_tokens(train, vocab_size=256)
    with pytest.raises(D.TokenFileError) as still_refused:
        D.load_tokens(val, vocab_size=256)
    assert str(still_refused.value) == str(refused.value)


FUZZ = """
import pickle, random
rng = random.Random(1)
valid = []
for protocol in (2, 3, 4, 5):
    shared = [3, 1, 4, 1, 5]  # one list the pickle refers to twice (its memo)
    forms = [np.arange(50, dtype=np.uint16), np.arange(40, dtype=np.int64), list(range(300)),
             [[1, 2], np.arange(3, dtype=np.uint8)], [shared, shared, (9, 2, 6)]]
    valid += [pickle.dumps(form, protocol=protocol) for form in forms]
outcomes = {"loaded": 0, "refused": 0}
for case in range(2000):
    data = bytearray(rng.choice(valid))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.7:  # overwrite a byte
            data[i] = rng.randrange(256)
        elif kind < 0.85:  # insert one
            data.insert(i, rng.randrange(256))
        else:  # delete one
            del data[i]
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data))]
    # a new file each time: on ext4, rewriting one file in place was 20 times slower
    path = os.path.join(sys.argv[1], f"damaged{case}.pkl")
    with open(path, "wb") as f:
        f.write(data)
    try:
        ids = D.load_tokens(path, vocab_size=1 << 20)
    except D.TokenFileError as e:
        assert "\\n" not in str(e) and str(e).startswith(path + ": "), str(e)
        outcomes["refused"] += 1
    else:
        assert isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu", repr(ids)
        assert 0 < len(ids) <= len(data) and 0 <= ids.min() and ids.max() < 1 << 20
        outcomes["loaded"] += 1
    os.remove(path)
print(outcomes)
"""


def test_damaged_pickles_load_as_token_ids_or_give_one_line(tmp_path):
    """2,000 random byte changes, insertions, deletions and truncations of valid pickles
    (protocols 2 to 5; arrays, lists and lists of documents), in a child process under a memory
    limit, so that a crash (numpy's own rebuild functions segfaulted on some of these) or a huge
    allocation fails the test instead of pytest. Each file loads as a 1-D integer array or gives
    one line: any other exception ends the child with a traceback."""
    result = run([PYTHON, "-c", MEMORY_LIMIT + FUZZ, tmp_path], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    outcomes = eval(result.stdout)  # the dict printed by FUZZ
    assert outcomes["refused"] > 1000 and outcomes["loaded"] > 100
    assert sum(outcomes.values()) == 2000


def write_every_format(tokens, folder):
    """The same ids in every accepted layout; returns {name: (path, bin_dtype)}."""
    files = {}
    for protocol in (2, 4, 5):
        files[f"array-p{protocol}.pkl"] = pickle.dumps(tokens.astype(np.uint16), protocol=protocol)
    # numpy 1.x wrote numpy.core where numpy 2.x writes numpy._core (protocol 2: plain-text names)
    numpy1 = pickle.dumps(tokens.astype(np.uint16), protocol=2)
    files["numpy1-p2.pkl"] = numpy1.replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in files["numpy1-p2.pkl"]
    files["list.pkl"] = pickle.dumps(tokens.tolist())
    files["documents.pkl"] = pickle.dumps([tokens[:100].tolist(), tokens[100:].astype(np.int32)])
    files["int-scalars.pkl"] = pickle.dumps([np.int64(t) for t in tokens])
    files["raw16.bin"] = tokens.astype(np.uint16).tobytes()
    files["raw32.bin"] = tokens.astype(np.uint32).tobytes()
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 2, len(tokens)]  # llm.c header, version 2 = uint32
    files["llmc.bin"] = header.tobytes() + tokens.astype(np.uint32).tobytes()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    np.save(folder / "array.npy", tokens.astype(np.int64))
    paths = {name: (folder / name, None) for name in [*files, "array.npy"]}
    paths["raw32.bin"] = (folder / "raw32.bin", "uint32")
    return paths


def test_every_file_format_gives_identical_batches(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, size=700)
    expected = take(D.DistributedDataLoader(tokens, 3, 7, rank=1, world_size=2), 20)
    paths = write_every_format(tokens, tmp_path)
    assert len(paths) == 11
    for name, (path, bin_dtype) in paths.items():
        ids = D.load_tokens(path, vocab_size=1000, bin_dtype=bin_dtype)
        batches = take(D.DistributedDataLoader(ids, 3, 7, rank=1, world_size=2), 20)
        for (x, y), (x_ref, y_ref) in zip(batches, expected, strict=True):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref), name


def bad_file(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    return path


@pytest.mark.parametrize(
    "name, content, bin_dtype, message",
    [
        ("empty.pkl", [], None, "holds no tokens"),
        ("empty.bin", b"", None, "holds no tokens"),
        ("empty.npy", np.zeros(0, dtype=np.int64), None, "holds no tokens"),
        ("floats.npy", np.ones(10, dtype=np.float32), None, "holds a 1-D array of float32; token"),
        ("matrix.npy", np.ones((2, 5), dtype=np.int64), None, "holds a 2-D array of int64; token"),
        ("floats.pkl", [1.0, 2.0], None, "expected a list or 1-D array of integer token ids"),
        ("text.pkl", "hello", None, "expected a list or 1-D array of integer token ids"),
        ("odd.bin", b"\1\0\2", None, "3 bytes is not a whole number of uint16 tokens; wrong"),
        ("six.bin", bytes(6), "uint32", "6 bytes is not a whole number of uint32 tokens; wrong"),
        ("big.pkl", [1, 2, 256], None, "token id 256 is outside the model's vocabulary of 256 "),
        ("negative.pkl", [1, -3, 2], None, "token id -3 is outside the model's vocabulary of 256"),
        ("truncated.pkl", pickle.dumps(list(range(50)))[:-9], None, "not a readable pickle"),
        ("tokens.txt", b"1 2 3", None, "unknown file type; use .pkl, .npy or .bin"),
    ],
)
def test_bad_token_files_give_one_clear_line(tmp_path, name, content, bin_dtype, message):
    path = bad_file(tmp_path, name, content)
    with pytest.raises(D.TokenFileError) as error:
        D.load_tokens(path, vocab_size=256, bin_dtype=bin_dtype)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_llmc_header_errors(tmp_path):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, 10]  # promises 10 uint16 tokens
    short = bad_file(tmp_path, "short.bin", header.tobytes() + bytes(8))
    with pytest.raises(D.TokenFileError, match="header promises 10 tokens, file size disagrees"):
        D.load_tokens(short, vocab_size=256)
    ok = bad_file(tmp_path, "ok.bin", header.tobytes() + bytes(20))
    with pytest.raises(D.TokenFileError, match="its header says uint16, but --bin_dtype is uint32"):
        D.load_tokens(ok, vocab_size=256, bin_dtype="uint32")
    assert len(D.load_tokens(ok, vocab_size=256)) == 10


def test_missing_file_and_a_stream_shorter_than_one_window_per_rank(tmp_path):
    with pytest.raises(D.TokenFileError, match="no such file"):
        D.load_tokens(tmp_path / "nope.pkl", vocab_size=256)
    with pytest.raises(D.TokenFileError) as error:
        D.DistributedDataLoader(np.arange(64), 4, 8, rank=0, world_size=2, name="val.pkl")
    assert str(error.value) == (
        "val.pkl: 64 tokens are fewer than one window per rank (world_size 2 x batch_size 4 x "
        "seq_len 8 + 1 = 65); use more data or a smaller batch_size or seq_len"
    )
    assert D.DistributedDataLoader(np.arange(65), 4, 8, rank=1, world_size=2).steps_per_pass == 1


def test_make_toy_data_writes_the_same_stream_in_every_format(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, a rank read its shard. " * 50)
    result = run(
        [PYTHON, script("06_llama_ddp/make_toy_data.py"), "--input", text, "--out_dir", tmp_path,
         "--formats", "pkl", "npy", "bin"],
        timeout=60,
        check=True,
    )  # fmt: skip
    assert "wrote" in result.stdout
    for split in ("train", "val"):
        streams = [D.load_tokens(tmp_path / f"{split}.{f}", 256) for f in ("pkl", "npy", "bin")]
        assert all(np.array_equal(streams[0], s) for s in streams)
    train = D.load_tokens(tmp_path / "train.pkl", 256)
    val = D.load_tokens(tmp_path / "val.pkl", 256)
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == text.read_bytes()
    assert len(val) == int(len(text.read_bytes()) * 0.1)

    missing = run([PYTHON, script("06_llama_ddp/make_toy_data.py"), "--input", tmp_path / "no"])
    assert missing.returncode != 0
    assert missing.stderr == (
        f"make_toy_data.py: error: --input {tmp_path / 'no'} does not exist; "
        "give a text file or a folder\n"
    )


def test_make_toy_data_streams_a_folder_into_one_stream_with_byte_0_between_files(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    files = {"a.txt": b"first file\n" * 30, "b.md": b"second" * 40, "sub/c.py": b"x = 1\n" * 50}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "skipped.bin").write_bytes(b"not text")
    toy = load_script("06_llama_ddp/make_toy_data.py", "toy_data")
    toy.BLOCK = 7  # files copied 7 bytes at a time: blocks straddle files and the split
    toy.main(["--input", str(folder), "--out_dir", str(tmp_path), "--formats", "bin", "npy", "pkl"])
    stream = b"\0".join(files[n] for n in ["a.txt", "b.md", "sub/c.py"])
    for fmt in ("bin", "npy", "pkl"):
        train = D.load_tokens(tmp_path / f"train.{fmt}", 256)
        val = D.load_tokens(tmp_path / f"val.{fmt}", 256)
        assert bytes(np.concatenate([train, val]).astype(np.uint8)) == stream, fmt
        assert len(val) == int(len(stream) * 0.1)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_list_of_documents_is_one_stream_with_nothing_put_between_them(tmp_path):
    """No id separates documents in every vocabulary, so the loader adds none: a document ends
    with the end-of-text id its tokenizer gives it (make_toy_data.py: byte 0 between files)."""
    path = tmp_path / "docs.pkl"
    path.write_bytes(pickle.dumps([[5, 6, 0], np.array([7, 0], dtype=np.uint16), [8]]))
    assert D.load_tokens(path, vocab_size=256).tolist() == [5, 6, 0, 7, 0, 8]


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_memory_mapped_files_are_not_scanned_and_a_bad_id_is_refused_when_drawn(tmp_path, suffix):
    """A memory-mapped file is never read whole at start-up (every rank would read the whole
    corpus): its ids are checked as the loader draws them, before they reach the embedding (on
    CUDA a device-side assert). Here the bad id sits in the third window only."""
    ids = np.arange(100, dtype=np.uint16) % 256
    ids[-5] = 300
    path = tmp_path / f"tokens{suffix}"
    ids.tofile(path) if suffix == ".bin" else np.save(path, ids)
    tokens = D.load_tokens(path, vocab_size=256)  # no scan: no error yet
    loader = D.DistributedDataLoader(tokens, 2, 16, 0, 1, name=str(path), vocab_size=256)
    take(loader, 2)
    with pytest.raises(D.TokenFileError) as refused:
        loader.next_batch()
    assert str(refused.value) == (
        f"{path}: token id 300 is outside the model's vocabulary of 256 (ids 0..255); "
        "tokenize for this vocabulary, or pass --vocab_size 301 or more"
    )


def import_train06():
    return import_step("06_llama_ddp", "train")


def test_the_vocabulary_comes_from_a_flag_not_only_from_the_preset(tmp_path):
    """Ids up to 299 with the tiny preset (256 byte ids): refused in one line that names the
    flag; with --vocab_size 320 the tiny model trains on them."""
    train = import_train06()
    ids = np.random.default_rng(0).integers(0, 300, 4000)
    ids[7] = 299
    for split in ("train", "val"):
        (tmp_path / f"{split}.pkl").write_bytes(pickle.dumps(ids.tolist()))
    args = ["--train_file", tmp_path / "train.pkl", "--valid_file", tmp_path / "val.pkl"]
    args += ["--preset", "tiny", "--seq_len", 16, "--batch_size", 2, "--max_steps", 1]
    args += ["--eval_batches", 1, "--sample_every", 0, "--peak_flops", 1e12, "--device", "cpu"]
    args = [str(a) for a in args + ["--out_dir", tmp_path / "out"]]
    with pytest.raises(SystemExit) as refused:
        train.main(args)
    assert refused.value.code == (
        f"train.py: error: {tmp_path / 'train.pkl'}: token id 299 is outside the model's "
        "vocabulary of 256 (ids 0..255); tokenize for this vocabulary, or pass --vocab_size 300 "
        "or more"
    )
    train.main([*args, "--vocab_size", "320"])
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["vocab_size"] == 320 and ckpt["config"]["dim"] == 64  # tiny's width
    assert ckpt["model"]["tok_embeddings.weight"].shape == (320, 64)
