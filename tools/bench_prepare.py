"""How fast 05_gpt_ddp/prepare.py tokenizes, next to the tokenizer alone, and its peak memory.

    python tools/bench_prepare.py                       # 20 MB and 300 MB of text, GPT-2 BPE
    python tools/bench_prepare.py --sizes_mb 20 --repeats 1

For each size it writes a corpus into a temporary folder (this Python's standard library sources,
concatenated into files of about 1 MB and repeated until the size is reached), then, alternating,
`repeats` times each:
  - tiktoken: encode_ordinary_batch(files, num_threads=all cores) on the same text, read into
    memory a batch of files at a time; only the encoding is timed (the limit prepare.py can reach);
  - prepare.py: the whole run in a child process, wall time and peak RSS (VmHWM).
The best time of each is kept (the machine may be shared). It prints a Markdown table.
GPT-2's vocabulary must be in tiktoken's cache (TIKTOKEN_CACHE_DIR) or downloadable.
"""

import argparse
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "05_gpt_ddp" / "prepare.py"
FILE_BYTES = 1_000_000  # one corpus file: several stdlib modules, one document for prepare.py


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields.get("Model name", "unknown CPU").strip()


def make_corpus(folder, size):
    """Files of about FILE_BYTES of stdlib source text, size bytes in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts)
    folder.mkdir(parents=True)
    written, n_files, part = 0, 0, []
    while written < size:
        for path in sources:
            part.append(path.read_bytes())
            if sum(map(len, part)) >= FILE_BYTES or written + sum(map(len, part)) >= size:
                data = b"".join(part)[: size - written]  # may cut a character: U+FFFD
                (folder / f"{n_files:05d}.txt").write_bytes(data)
                written, n_files, part = written + len(data), n_files + 1, []
            if written >= size:
                break


def time_tokenizer(folder, threads):
    """Seconds encode_ordinary_batch spends on the folder's text, a batch of files at a time."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    files = sorted(Path(folder).iterdir())
    seconds, batch = 0.0, 32 * threads  # ~1 MB files: tens of MB of text in memory at once
    for i in range(0, len(files), batch):
        texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files[i : i + batch]]
        t0 = time.perf_counter()
        enc.encode_ordinary_batch(texts, num_threads=threads)
        seconds += time.perf_counter() - t0
    return seconds


# prepare.py in this interpreter, then its peak RSS. Not wait4's ru_maxrss: a child started from
# a large parent inherits the parent's peak at exec (Linux's exec_mmap records the old mm's).
PEAK_RSS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    print("peak RSS kB", status.split()[0], file=sys.stderr)
"""


def run_prepare(corpus, data_dir, threads):
    """Wall seconds, peak RSS (MB) and summary line of one prepare.py run."""
    cmd = [sys.executable, "-c", PEAK_RSS, PREPARE, "--input", corpus, "--data_dir", data_dir]
    cmd = [*map(str, cmd), "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"bench_prepare.py: prepare.py failed:\n{proc.stdout}{proc.stderr}")
    peak_kb = int(proc.stderr.rsplit("peak RSS kB", 1)[1])
    return seconds, peak_kb / 1024, proc.stdout.strip().splitlines()[-1]


def run_tokenizer(corpus, threads):
    """time_tokenizer in a child process of its own, as prepare.py runs in one."""
    cmd = [sys.executable, __file__, "--time_tokenizer", corpus, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
    return float(proc.stdout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes_mb", type=int, nargs="+", default=[20, 300])
    p.add_argument("--repeats", type=int, default=2, help="runs of each, the best kept")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.add_argument("--threads", type=int, default=cores, help="for tiktoken and prepare.py")
    p.add_argument("--time_tokenizer", help=argparse.SUPPRESS)  # the child that times tiktoken
    args = p.parse_args(argv)
    threads = args.threads
    if args.time_tokenizer:
        print(time_tokenizer(args.time_tokenizer, threads))
        return
    print(
        f"{cpu_model()}, {cores} cores usable, {threads} threads, "
        f"Python {platform.python_version()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size_mb in args.sizes_mb:
            size = size_mb * 1_000_000
            corpus = Path(tmp) / f"corpus{size_mb}"
            make_corpus(corpus, size)
            raw, prep, rss = [], [], []
            for _ in range(args.repeats):
                raw.append(run_tokenizer(corpus, threads))
                seconds, peak, summary = run_prepare(corpus, Path(tmp) / "d", threads)
                prep.append(seconds)
                rss.append(peak)
            print(f"{size_mb} MB: tokenizer {raw} s, prepare.py {prep} s, {rss} MB | {summary}")
            rows.append((size_mb, size / min(raw) / 1e6, size / min(prep) / 1e6, max(rss)))
    print("\n| text | tiktoken alone | prepare.py | ratio | prepare.py peak RSS |")
    print("|---|---|---|---|---|")
    for size_mb, raw_rate, prep_rate, peak in rows:
        print(
            f"| {size_mb} MB | {raw_rate:.1f} MB/s | {prep_rate:.1f} MB/s | "
            f"{prep_rate / raw_rate:.2f}x | {peak:.0f} MB |"
        )


if __name__ == "__main__":
    main()
