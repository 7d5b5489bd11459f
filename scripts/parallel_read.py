#!/usr/bin/env python3
"""Read a directory tree with P processes x T threads; report MB/s, IOPS and files/s.

Standard library only, so it runs on any compute node:

    parallel_read.py /mnt/lustrefuse/data -p 4 -t 8
    parallel_read.py /mnt/lustrefuse/data --list > files.txt          # walk once
    parallel_read.py /mnt/lustrefuse --files-from files.txt --shard 3/16 --json
    parallel_read.py --aggregate task-*.json                         # sum the shards

Files larger than --chunk are cut into ranges so a few large files still
spread over every thread. IOPS counts the read() calls made (each of at most
--bufsize bytes). With --shard I/N only every N-th work item starting at I is
read (one shard per Slurm task; see slurm_read.sbatch). --start-at EPOCH
makes every task start at the same wall-clock second, so --aggregate can
compute the combined rate as total bytes / (last end - first start).
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import socket
import sys
import threading
import time


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    if not num.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    return int(num) * mult


def walk(root: str) -> list[tuple[str, int]]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(d, name)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if os.path.isfile(p):
                out.append((p, st.st_size))
    return out


def read_list(path: str, root: str | None) -> list[tuple[str, int]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            size, _, p = line.partition("\t")
            if root and not os.path.isabs(p):
                p = os.path.join(root, p)
            out.append((p, int(size)))
    return out


def work_items(files, chunk: int) -> list[tuple[str, int, int]]:
    items = []
    for p, size in files:
        if size <= chunk:
            items.append((p, 0, size))
        else:
            items.extend((p, off, min(chunk, size - off)) for off in range(0, size, chunk))
    return items


def read_items(items, threads: int, bufsize: int, verbose: bool = False) -> dict:
    """Read ``items`` with ``threads`` threads; returns counters."""
    it = iter(items)
    lock = threading.Lock()
    tot = {"bytes": 0, "reads": 0, "items": 0, "errors": 0, "first_errors": []}

    def worker():
        buf = memoryview(bytearray(bufsize))
        b = r = n = 0
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                break
            path, off, length = item
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    pos, end = off, off + length
                    while pos < end:
                        got = os.preadv(fd, [buf[:min(bufsize, end - pos)]], pos)
                        r += 1
                        if not got:
                            break
                        pos += got
                        b += got
                finally:
                    os.close(fd)
                n += 1
            except OSError as e:
                with lock:
                    tot["errors"] += 1
                    if len(tot["first_errors"]) < 5:
                        tot["first_errors"].append(f"{path}: {e.strerror}")
        with lock:
            tot["bytes"] += b
            tot["reads"] += r
            tot["items"] += n

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return tot


def _proc(args):
    items, threads, bufsize = args
    return read_items(items, threads, bufsize)


def run(items, processes: int, threads: int, bufsize: int) -> tuple[dict, float, float]:
    start = time.time()
    t0 = time.perf_counter()
    if processes <= 1:
        results = [read_items(items, threads, bufsize)]
    else:
        parts = [items[i::processes] for i in range(processes)]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(processes) as pool:
            results = pool.map(_proc, [(p, threads, bufsize) for p in parts])
    dt = time.perf_counter() - t0
    tot = {"bytes": 0, "reads": 0, "items": 0, "errors": 0, "first_errors": []}
    for r in results:
        for k in ("bytes", "reads", "items", "errors"):
            tot[k] += r[k]
        tot["first_errors"] += r["first_errors"][: 5 - len(tot["first_errors"])]
    return tot, start, dt


def summary(tot: dict, seconds: float, files: int) -> dict:
    s = max(seconds, 1e-9)
    return {"files": files, "bytes": tot["bytes"], "reads": tot["reads"], "errors": tot["errors"],
            "seconds": round(seconds, 4), "MBps": round(tot["bytes"] / s / 1e6, 1),
            "IOPS": round(tot["reads"] / s, 1), "files_per_s": round(files / s, 1)}


def show(d: dict, label: str):
    print(f"{label}: {d['files']:,} files, {d['bytes'] / 1e6:,.1f} MB in {d['seconds']:.2f} s: "
          f"{d['MBps']:,.1f} MB/s, {d['IOPS']:,.0f} IOPS, {d['files_per_s']:,.1f} files/s"
          + (f", {d['errors']} ERRORS" if d["errors"] else ""))


def aggregate(paths: list[str]) -> int:
    tasks = []
    for pattern in paths:
        for p in sorted(glob.glob(pattern)) or [pattern]:
            with open(p) as f:
                tasks.append(json.load(f))
    if not tasks:
        print("no task results", file=sys.stderr)
        return 1
    start = min(t["start"] for t in tasks)
    end = max(t["start"] + t["seconds"] for t in tasks)
    tot = {k: sum(t[k] for t in tasks) for k in ("bytes", "reads", "errors")}
    d = summary(tot, end - start, sum(t["files"] for t in tasks))
    d["tasks"] = len(tasks)
    d["hosts"] = len({t.get("host") for t in tasks})
    show(d, f"{d['tasks']} tasks on {d['hosts']} hosts")
    slowest = max(tasks, key=lambda t: t["seconds"])
    print(f"slowest task: {slowest.get('host')} shard {slowest.get('shard')}: "
          f"{slowest['seconds']:.2f} s")
    return 1 if tot["errors"] else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("root", nargs="?", help="directory to read (or the base of --files-from paths)")
    p.add_argument("-p", "--processes", type=int, default=1, help="processes (default 1)")
    p.add_argument("-t", "--threads", type=int, default=8, help="threads per process (default 8)")
    p.add_argument("--bufsize", type=parse_size, default=1 << 20, help="read size (default 1M)")
    p.add_argument("--chunk", type=parse_size, default=64 << 20,
                   help="cut larger files into ranges of this size (default 64M)")
    p.add_argument("--files-from", help="file list from --list (SIZE<TAB>PATH a line)")
    p.add_argument("--max-files", type=int, help="read only the first N files")
    p.add_argument("--shard", help="I/N: read only work items I, I+N, I+2N...")
    p.add_argument("--start-at", type=float, help="wait until this Unix time before reading")
    p.add_argument("--list", action="store_true", help="print the file list and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--aggregate", nargs="+", metavar="JSON", help="combine task results")
    a = p.parse_args(argv)
    if a.aggregate:
        return aggregate(a.aggregate)
    if not a.root and not a.files_from:
        p.error("give a directory to read (or --files-from)")
    if a.processes < 1 or a.threads < 1 or a.bufsize < 1 or a.chunk < 1:
        p.error("--processes, --threads, --bufsize and --chunk must be positive")
    files = read_list(a.files_from, a.root) if a.files_from else walk(a.root)
    if a.max_files:
        files = files[: a.max_files]
    if a.list:
        for path, size in files:
            print(f"{size}\t{path}")
        return 0
    items = work_items(files, a.chunk)
    shard = "0/1"
    if a.shard:
        try:
            i, n = (int(x) for x in a.shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            p.error("--shard wants I/N with 0 <= I < N")
        items = items[i::n]
        shard = a.shard
    if a.start_at:
        time.sleep(max(0.0, a.start_at - time.time()))
    tot, start, dt = run(items, a.processes, a.threads, a.bufsize)
    d = summary(tot, dt, sum(1 for it in items if it[1] == 0))  # a file counts where it starts
    d.update(start=start, host=socket.gethostname(), shard=shard, processes=a.processes,
             threads=a.threads, bufsize=a.bufsize, first_errors=tot["first_errors"])
    if a.json:
        print(json.dumps(d))
    else:
        show(d, f"{a.processes} x {a.threads} readers")
        for e in tot["first_errors"]:
            print(f"  error: {e}", file=sys.stderr)
    return 1 if tot["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
