"""Step 05's prepare.py at corpus scale, and what train.py checks at start-up and per batch.

prepare.py reads documents in pieces, tokenizes them on several threads and appends the ids to the
token files as it goes. These tests pin what that must not change (the ids, their order, the
separators and the split are exactly those of tokenizing each document whole), that memory does
not grow with the corpus, that a run stopped half-way leaves nothing train.py accepts, and that
train.py checks the files against meta.json without reading them whole.
"""

import json
import os
import signal

import numpy as np
import pytest
from helpers import (
    PYTHON,
    ROOT,
    import_step,
    load_script,
    run,
    script,
    start,
    stop,
    wait_for,
    worker_env,
)

PREP = load_script("05_gpt_ddp/prepare.py", "prepare_under_test")
PREPARE = script("05_gpt_ddp/prepare.py")


TRAIN05 = import_step("05_gpt_ddp", "train")

# one corpus with what a piece or batch boundary could get wrong; "z.txt" is a blank file
DOCUMENTS = {
    "a.txt": b"Hello world\n" * 40,
    "b.md": "naïve café — 東京 😀\n  indented\n\n\n   trailing   \n".encode() * 10,
    "c.py": b"def f(x):\n    return x  # <|endoftext|> is plain text here\n" * 30,
    "d.txt": b"ok \xff\xfe bad \xe2\x82 end\n" * 5,  # invalid UTF-8: U+FFFD, as decode() makes it
    "e.txt": b"q",
    "sub/f.rst": b"Tabs\tand  double  spaces,\r\nCRLF lines.\r\n" * 20,
    "z.txt": b"  \n\n ",
}
# a line with no whitespace longer than a piece: only there may a cut change GPT-2's tokens
NO_SPACES = {"long.txt": b"x" * 300 + b" end\n"}


def write_corpus(folder, documents):
    for name, data in documents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def expected_files(folder, encode, separator, val_fraction=0.1):
    """train and val ids as the old, whole-document prepare.py made them."""
    train, val = [], []
    for path in PREP.find_files(folder):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            continue
        ids = list(encode(text)) + [separator]
        cut = len(ids) - int(len(ids) * val_fraction)
        train += ids[:cut]
        val += ids[cut:]
    return train, val


def read_split(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    train = np.fromfile(data_dir / "train.bin", np.uint16).tolist()
    val = np.fromfile(data_dir / "val.bin", np.uint16).tolist()
    return meta, train, val


@pytest.fixture(scope="module")
def gpt2(gpt2_env):
    """tiktoken's GPT-2 encoding in this process (and prepare.main's), from the offline cache."""
    import tiktoken

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", gpt2_env["TIKTOKEN_CACHE_DIR"])
        yield tiktoken.get_encoding("gpt2")


@pytest.mark.parametrize("chunk_bytes", [64, 100_000])  # pieces of documents; whole documents
@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_token_files_equal_the_tokenizer_on_whole_documents(
    tmp_path, tokenizer, chunk_bytes, request
):
    documents = dict(DOCUMENTS, **(NO_SPACES if tokenizer == "char" else {}))
    corpus = write_corpus(tmp_path / "corpus", documents)
    if tokenizer == "gpt2":
        enc = request.getfixturevalue("gpt2")
        encode, separator = enc.encode_ordinary, enc.eot_token  # the old prepare.py's encode
    else:
        encode, separator = (lambda text: text.encode("utf-8")), 0
    train, val = expected_files(corpus, encode, separator)
    assert len(val) > 50

    data = tmp_path / "data"
    argv = ["--input", corpus, "--data_dir", data, "--tokenizer", tokenizer, "--threads", 3]
    PREP.main([str(a) for a in argv + ["--chunk_bytes", chunk_bytes]])
    meta, got_train, got_val = read_split(data)
    assert got_train == train and got_val == val
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["max_id"] == max(train + val) and meta["documents"] == len(documents) - 1
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_no_silent_cap_on_an_input_and_the_summary_says_what_was_used(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", DOCUMENTS)
    total = sum(map(len, DOCUMENTS.values()))
    PREP.main(["--input", str(corpus), "--data_dir", str(tmp_path / "all"), "--tokenizer", "char"])
    assert f", all {total:,} bytes in {corpus}:" in capsys.readouterr().out
    assert read_split(tmp_path / "all")[0]["bytes_read"] == total

    capped = ["--data_dir", str(tmp_path / "cap"), "--max_bytes", "500"]
    PREP.main(["--input", str(corpus), "--tokenizer", "char", *capped])
    line = capsys.readouterr().out
    assert f"2 documents, 500 of {total:,} bytes (--max_bytes 500) in {corpus}:" in line
    meta, train, val = read_split(tmp_path / "cap")
    # a.txt whole (480 bytes), then the first 20 bytes of b.md, each with its separator
    text = DOCUMENTS["a.txt"] + DOCUMENTS["b.md"][:20]
    assert sorted(train + val) == sorted([*text, 0, 0])


# Peak memory: VmHWM of prepare.py's own process. Not wait4's ru_maxrss: a child started from
# pytest inherits pytest's peak at exec (Linux's exec_mmap records the old address space's).
PEAK_RSS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("peak RSS kB", open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def peak_rss_mb(corpus, data_dir, *args):
    cmd = [PYTHON, "-c", PEAK_RSS, PREPARE, "--input", corpus, "--data_dir", data_dir, *args]
    result = run(cmd, timeout=300, check=True)
    return int(result.stdout.rsplit("peak RSS kB", 1)[1]) / 1024, result.stdout


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """100 MB of text, read in 64 kB pieces: peak memory as for its first 12.5 MB, and under
    62.5 MB. The old prepare.py held every id in a Python list (8 bytes per byte of text here, 15
    with GPT-2): over 1 GB."""
    document = b"".join(DOCUMENTS.values()) * 4200  # 12.5 MB, every kind of text above
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.txt").write_bytes(document)
    args = ["--tokenizer", "char", "--chunk_bytes", 65536, "--threads", 2]
    small, _ = peak_rss_mb(folder / "0.txt", tmp_path / "d1", *args)
    large, out = peak_rss_mb(folder, tmp_path / "d8", *args)
    assert f"8 documents, all {8 * len(document):,} bytes" in out  # 100 MB
    assert large < 100 / 8 * 5 and large - small < 8, (small, large)  # MB


def slow_prepare(corpus, data_dir):
    """prepare.py with a pause after each piece it writes, so a test can stop it half-way."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import prepare; add = prepare."
        "SplitWriter.add; prepare.SplitWriter.add = lambda *a: (time.sleep(0.02), add(*a)); "
        "prepare.main(sys.argv[2:])"
    )
    folder = ROOT / "05_gpt_ddp"
    argv = ["--input", corpus, "--data_dir", data_dir, "--tokenizer", "char", "--chunk_bytes", 64]
    return start([PYTHON, "-c", code, folder, *argv], env=worker_env())


def test_a_run_stopped_half_way_leaves_nothing_train_py_accepts(tmp_path):
    train = TRAIN05
    corpus = write_corpus(tmp_path / "corpus", DOCUMENTS)
    data = tmp_path / "data"
    PREP.main(["--input", str(corpus), "--data_dir", str(data), "--tokenizer", "char"])
    assert train.load_meta(data)["train_tokens"] > 0  # a whole data set, from an earlier run

    proc = slow_prepare(corpus, data)
    try:
        tmp = data / "train.bin.tmp"
        wait_for(tmp.exists, 60, "prepare.py to start writing")  # meta.json is gone by then
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc)
    assert (data / "train.bin").exists() and not (data / "meta.json").exists()
    with pytest.raises(SystemExit) as refused:
        train.main(["--data_dir", str(data), "--out_dir", str(tmp_path / "out")])
    assert refused.value.code == (
        f"train.py: error: {data / 'meta.json'} not found; run prepare.py --data_dir {data} first"
    )

    # Ctrl-C (or any error) in the middle: the same, and no .tmp files are left behind
    def interrupt(*args):
        raise KeyboardInterrupt

    add, PREP.SplitWriter.add = PREP.SplitWriter.add, interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            PREP.main(["--input", str(corpus), "--data_dir", str(data), "--tokenizer", "char"])
    finally:
        PREP.SplitWriter.add = add
    assert sorted(p.name for p in data.iterdir()) == ["train.bin", "val.bin"]


# train.py's start-up: meta.json, not a scan ----------------------------------------------------


def fake_data(folder, n_tokens, **meta):
    """A data folder with a sparse train.bin of n_tokens zeros (no disk, no page cache)."""
    folder.mkdir()
    with open(folder / "train.bin", "wb") as f:
        f.truncate(2 * n_tokens)
    np.arange(200, dtype=np.uint16).tofile(folder / "val.bin")
    fields = {"format": 2, "vocab_size": 256, "separator": 0, "train_tokens": n_tokens}
    fields.update({"val_tokens": 200, "max_id": 199, **meta})
    (folder / "meta.json").write_text(json.dumps(fields))
    return folder


def test_start_up_does_not_read_the_token_files(tmp_path):
    """1 GB of tokens whose last id is past the vocabulary, unknown to meta.json: start-up checks
    the files against meta.json only, so it returns at once, where a scan of every id (as
    train.py did, on every rank, before the group existed) would read the whole file first and
    refuse it. That id is still refused, when a batch draws it (the next test)."""
    data = fake_data(tmp_path / "data", 2**29)
    with open(data / "train.bin", "r+b") as f:
        f.seek(2 * (2**29 - 1))
        f.write(np.uint16(300).tobytes())
    tokens = TRAIN05.load_split(data, "train", 64, TRAIN05.load_meta(data))
    assert len(tokens) == 2**29 and tokens[-1] == 300


def test_files_that_disagree_with_meta_json_are_refused_in_one_line(tmp_path):
    def refusal(data, split="train"):
        with pytest.raises(SystemExit) as refused:
            TRAIN05.load_split(data, split, 64, TRAIN05.load_meta(data))
        return refused.value.code

    short = fake_data(tmp_path / "short", 1000, train_tokens=1001)  # a copy cut short
    assert refusal(short) == (
        f"train.py: error: {short / 'train.bin'} holds 1000 tokens, meta.json says 1001; "
        "run prepare.py again"
    )
    wide = fake_data(tmp_path / "wide", 1000, max_id=256)
    assert refusal(wide, "val") == (
        f"train.py: error: {wide / 'val.bin'} has ids past meta.json's vocabulary of 256; "
        "run prepare.py again"
    )
    old = fake_data(tmp_path / "old", 1000, format=1)
    with pytest.raises(SystemExit) as refused:
        TRAIN05.load_meta(old)
    assert refused.value.code == (
        f"train.py: error: {old / 'meta.json'} is from an older prepare.py; "
        f"run prepare.py --data_dir {old} again"
    )


def test_an_id_past_the_vocabulary_is_refused_when_its_batch_is_drawn():
    """meta.json can be out of date with its files (a file changed or copied since): the ids of
    every batch are checked before they reach the embedding (a device-side assert on CUDA)."""
    tokens = np.zeros(10_000, np.uint16)
    tokens[5000:] = 300
    cpu = TRAIN05.torch.device("cpu")
    x, _ = TRAIN05.get_batch(tokens[:5000], 4, 64, cpu, 1, 2, vocab_size=256)  # fine
    assert x.shape == (4, 64)
    with pytest.raises(SystemExit) as refused:
        TRAIN05.get_batch(tokens[5000:], 4, 64, cpu, 1, 2, vocab_size=256)
    assert refused.value.code == (
        "train.py: error: token id 300 in a batch is past the model's vocabulary of 256: the "
        "token files changed after prepare.py wrote them; run prepare.py again"
    )
