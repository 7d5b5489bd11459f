#!/usr/bin/env python3
"""What any pyfuse3 filesystem can reach on this machine: the floor under lustrefuse.

Serves a local tree through the thinnest pyfuse3 filesystem possible (names and
attributes from a dict, a large file by one inline ``pread`` per request,
``keep_cache`` on, 1 MiB read-ahead as our mount sets it) and measures it against
the same tree read directly, for the rows of ``lustrefuse bench`` that pyfuse3
itself bounds:

    small files from memory, page cache dropped (files/s, N readers)
    small files from disk, page cache dropped   (files/s, N readers)
    sequential read, page cache dropped (MB/s)
    sequential re-read, page cache warm (MB/s)

The tree is served twice: under ``mem/`` small files' bytes come from memory (no
design can do less per file); under ``disk/`` each open starts the disk read of the
file (``posix_fadvise(WILLNEED)``, as our mount does) and each read is an inline
``pread`` of it, which is what a filesystem that keeps its data on local disk must
do at least (hydrated files on an OST are that case).

If the floor's ratio is below a target, no pyfuse3 design meets it here; if the
floor is far above our figure, the gap is ours. Needs root (FUSE, drop_caches).

    scripts/fuse_floor.py                 # 2,000 x 128 KiB, 1 GiB, 8 readers, 3 samples
    scripts/fuse_floor.py --repeat 5 --json
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xxhash  # noqa: E402

from lustrefuse import demo, services  # noqa: E402
from lustrefuse.bench import Caches  # noqa: E402

INLINE_MAX = 64 << 20  # files above this are read from disk per request, not held in memory


def serve(src: str, mountpoint: str):
    """The trivial filesystem (run in its own process, as our mount is)."""
    import pyfuse3
    import trio

    class Floor(pyfuse3.Operations):
        def __init__(self):
            super().__init__()
            # ino -> (path, bytes | fd | None: opened per open, from disk)
            self.nodes = {pyfuse3.ROOT_INODE: (src, None)}
            self.children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
            self.open_fds: dict[int, int] = {}  # fh -> fd, for the disk view
            self._fh = iter(range(1 << 32, 1 << 62))
            for view, in_memory in ((b"mem", True), (b"disk", False)):
                ino = len(self.nodes) + pyfuse3.ROOT_INODE
                self.nodes[ino] = (src, None)
                self.children[pyfuse3.ROOT_INODE][view] = ino
                self._scan(ino, src, in_memory)

        def _scan(self, ino: int, path: str, in_memory: bool):
            kids = self.children[ino] = {}
            for name in sorted(os.listdir(path)):
                p = os.path.join(path, name)
                child = len(self.nodes) + pyfuse3.ROOT_INODE
                data = None
                if os.path.isfile(p):
                    if os.path.getsize(p) > INLINE_MAX:
                        data = os.open(p, os.O_RDONLY)
                    elif in_memory:
                        with open(p, "rb") as f:
                            data = f.read()
                self.nodes[child] = (p, data)
                kids[name.encode()] = child
                if os.path.isdir(p):
                    self._scan(child, p, in_memory)

        def _attr(self, ino: int):
            path, data = self.nodes[ino]
            st = os.lstat(path)
            e = pyfuse3.EntryAttributes()
            e.st_ino, e.st_mode, e.st_nlink, e.st_size = ino, st.st_mode, st.st_nlink, st.st_size
            e.st_mtime_ns = e.st_ctime_ns = e.st_atime_ns = st.st_mtime_ns
            e.st_blksize, e.st_blocks = 4096, st.st_blocks
            return e

        async def lookup(self, parent, name, ctx=None):
            child = self.children.get(parent, {}).get(bytes(name))
            if child is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(child)

        async def getattr(self, inode, ctx=None):
            return self._attr(inode)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            entries = list(self.children[fh].items())
            for i, (name, child) in enumerate(entries[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, self._attr(child), i + 1):
                    return

        async def open(self, inode, flags, ctx):
            path, data = self.nodes[inode]
            if data is not None:
                return pyfuse3.FileInfo(fh=inode, keep_cache=True)
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 1 << 20, os.POSIX_FADV_WILLNEED)
            fh = next(self._fh)
            self.open_fds[fh] = fd
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

        async def read(self, fh, off, size):
            fd = self.open_fds.get(fh)
            if fd is not None:
                return os.pread(fd, size, off)
            data = self.nodes[fh][1]
            return os.pread(data, size, off) if isinstance(data, int) else data[off:off + size]

        async def release(self, fh):
            fd = self.open_fds.pop(fh, None)
            if fd is not None:
                os.close(fd)

    options = set(pyfuse3.default_options) | {"fsname=fuse_floor", "noatime"}
    pyfuse3.init(Floor(), mountpoint, options)
    services.set_read_ahead(mountpoint)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main, 4, 128)
    finally:
        pyfuse3.close()


def make_tree(root: str, small_files: int, small_size: int, large_size: int):
    specs = []
    for path in demo.small_paths(small_files):
        data = os.urandom(small_size)
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
        specs.append(demo.FileSpec(path, small_size, xxhash.xxh3_128_hexdigest(data)))
    large = demo.FileSpec("large", large_size, "")
    h = xxhash.xxh3_128()
    with open(os.path.join(root, "large"), "wb") as f:
        for off in range(0, large_size, 16 << 20):  # bounded: large_size / 16 MiB writes
            block = os.urandom(min(16 << 20, large_size - off))
            h.update(block)
            f.write(block)
    large.digest = h.hexdigest()
    return specs, large


def read_checked(root: str, spec: demo.FileSpec) -> float:
    """MB/s of one whole read of ``spec`` under ``root``, every byte checked."""
    r = demo.read_file_checked(root, spec)
    if r.mismatches or r.bytes != spec.size:
        raise demo.DataMismatch(f"{root}/{spec.path}: read {r.bytes} bytes that differ "
                                "from what was written")
    return r.mbps


def measure(src: str, mnt: str, small, large, readers: int, repeat: int, caches: Caches):
    rows = {"small files from memory, page cache dropped": ([], []),
            "small files from disk, page cache dropped": ([], []),
            "sequential read, page cache dropped": ([], []),
            "sequential re-read, page cache warm": ([], [])}
    mem_fs, mem_local = rows["small files from memory, page cache dropped"]
    disk_fs, disk_local = rows["small files from disk, page cache dropped"]
    seq_fs, seq_local = rows["sequential read, page cache dropped"]
    warm_fs, warm_local = rows["sequential re-read, page cache warm"]
    mem, disk = os.path.join(mnt, "mem"), os.path.join(mnt, "disk")
    big_paths = [os.path.join(root, large.path) for root in (mem, src)]
    small_paths = [os.path.join(root, f.path) for root in (mem, disk, src) for f in small]
    for _ in range(repeat):  # A and B interleaved: the machine's noise hits both
        for root, out in ((mem, mem_fs), (src, mem_local), (disk, disk_fs), (src, disk_local)):
            caches.drop(small_paths)
            r = demo.parallel_read(root, small, readers)
            if r.mismatches:
                raise demo.DataMismatch(f"small files differ under {root}: {r.mismatches[:3]}")
            out.append(r.files_per_s)
        for root, out in ((mem, seq_fs), (src, seq_local)):
            caches.drop(big_paths)
            out.append(read_checked(root, large))
    read_checked(mem, large)  # every page cached on both sides
    read_checked(src, large)
    for _ in range(repeat * 3):  # cheap: 3 pairs a sample
        warm_fs.append(read_checked(mem, large))
        warm_local.append(read_checked(src, large))
    out = []
    for name, (fs, local) in rows.items():
        unit = "files/s" if name.startswith("small") else "MB/s"
        f, loc = statistics.median(fs), statistics.median(local)
        out.append({"row": name, "unit": unit, "floor": f, "local": loc, "ratio": f / loc,
                    "floor_samples": fs, "local_samples": local})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="fuse_floor.py",
        description="Measure the thinnest pyfuse3 filesystem against local reads of the same "
                    "tree: the ceiling of any pyfuse3 design on this machine. Exits 1 if any "
                    "byte read differs, never because of speed.")
    p.add_argument("--dir", help="work directory on the disk to measure (default: a new one "
                   "under /var/tmp, removed afterwards)")
    p.add_argument("--small-files", type=int, default=2000, help="default 2000")
    p.add_argument("--small-size", type=demo.parse_size, default=128 << 10, help="default 128K")
    p.add_argument("--large-size", type=demo.parse_size, default=1 << 30, help="default 1G")
    p.add_argument("--readers", type=int, default=8, help="parallel readers (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="samples per figure (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--serve", nargs=2, metavar=("SRC", "MOUNTPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    if os.geteuid() != 0:
        p.error("needs root: it mounts FUSE and drops the page cache")
    if min(args.small_files, args.readers, args.repeat) < 1 or args.large_size < 1:
        p.error("--small-files, --readers, --repeat and --large-size must be positive")
    work = args.dir or tempfile.mkdtemp(prefix="fuse_floor-", dir="/var/tmp")
    src, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
    os.makedirs(src, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    proc = None
    try:
        print(f"writing {args.small_files} x {demo.fmt_size(args.small_size)} and "
              f"{demo.fmt_size(args.large_size)} under {src}", file=sys.stderr)
        small, large = make_tree(src, args.small_files, args.small_size, args.large_size)
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", src, mnt],
                                stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise demo.DemoError("the trivial filesystem did not mount")
        caches = Caches(True)
        print(f"measuring ({args.repeat} sample{'s' if args.repeat != 1 else ''}; "
              f"caches: {caches.how})", file=sys.stderr)
        rows = measure(src, mnt, small, large, args.readers, args.repeat, caches)
    except demo.DemoError as e:
        print(f"fuse_floor: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            subprocess.run(["fusermount3", "-u", mnt], check=False)
            proc.wait(timeout=30)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"machine": demo.machine_info(), "readers": args.readers,
                          "repeat": args.repeat, "rows": rows}, indent=1))
        return 0
    print(f"the thinnest pyfuse3 filesystem against local reads; {demo.machine_info()}; "
          f"{args.readers} readers for small files; median of {args.repeat} "
          f"({args.repeat * 3} for the warm re-read)")
    print(f"{'row':40} {'floor':>14} {'local':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['row']:40} {r['floor']:>8,.0f} {r['unit']:<5} {r['local']:>8,.0f} "
              f"{r['unit']:<5} {r['ratio']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
