"""Plain helpers for the lustrefuse test-suite: processes, mounts, S3 puts, waits.

Nothing here is a pytest fixture; ``conftest.py`` builds the fixtures on top.
The :class:`FS` object is what ``make_fs`` returns: one real filesystem brought up
with ``lustrefuse up`` (supervisor, MDS, OSTs and FUSE client as real processes)
over a real moto server reached by HTTP.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
LUSTREFUSE = str(VENV_BIN / "lustrefuse")
LFS = str(VENV_BIN / "lfs")
CTL = ".lustrefuse_ctl"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

MiB = 1024 * 1024
KiB = 1024

UP_TIMEOUT = 180.0
DOWN_TIMEOUT = 60.0


# -- small utilities ---------------------------------------------------------

def env() -> dict:
    """The environment for every subprocess: test credentials, no real AWS config."""
    e = dict(os.environ)
    e.update(AWS_ENV)
    e.pop("AWS_PROFILE", None)
    e.pop("LUSTREFUSE_SUPERVISOR", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``cond()`` until it returns a truthy value; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # keep polling; report the last error on timeout
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def data(n: int, seed) -> bytes:
    """Deterministic pseudo-random bytes (fast, reproducible in failure messages)."""
    return random.Random(str(seed)).randbytes(n)


def big_data(n: int, seed) -> bytes:
    """Deterministic bytes for large files, cheap to make: one random MiB, rotated by a
    different amount for every MiB of the file, so no two MiB (nor two 4K pages at
    different offsets, in practice) are alike and misplaced data is detected."""
    base = random.Random(str(seed)).randbytes(MiB)
    out = bytearray()
    i = 0
    while len(out) < n:
        r = (i * 104729 + 4099) % MiB
        out += base[r:] + base[:r]
        i += 1
    return bytes(out[:n])


def unique(prefix: str = "lf") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def mountinfo() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount, with /proc's octal escapes undone."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            out.append((mp, fields[sep + 1]))
    return out


def is_mounted(path) -> bool:
    p = os.path.abspath(str(path))
    return any(mp == p for mp, _ in mountinfo())


def ping(address: str) -> bool:
    """Whether the RPC server at ``address`` (an MDS or OST socket) answers; raises
    if it does not listen (``wait_for`` keeps polling through that)."""
    from lustrefuse import rpc

    c = rpc.Client(address, timeout=3)
    try:
        return c.call("ping") is not None
    finally:
        c.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def procs_mentioning(text: str) -> list[int]:
    """Pids (not ours) whose command line contains ``text`` (e.g. a unique data dir)."""
    me = os.getpid()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and pid_alive(int(d)):
            found.append(int(d))
    return found


def kill_pids(pids) -> None:
    """SIGKILL the given pids (only ever pids this suite started)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGKILL)


def du(path) -> int:
    """Bytes allocated under ``path`` (st_blocks, as du counts them)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def read_file(path, chunk: int = 4 * MiB) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pread_uncached(path, offset: int, length: int) -> bytes:
    """One read through FUSE with kernel read-ahead off (POSIX_FADV_RANDOM), and the
    file's clean page-cache pages dropped first, so the request reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def drop_file_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def tail(path, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(lines[-n:])


def log_tails(data_dir, n: int = 40) -> str:
    logdir = Path(data_dir) / "log"
    if not logdir.is_dir():
        return f"<no log directory in {data_dir}>"
    parts = []
    for p in sorted(logdir.glob("*.log")):
        parts.append(f"----- {p} (last {n} lines) -----\n{tail(p, n)}")
    return "\n".join(parts)


# -- S3 --------------------------------------------------------------------

def s3_client(endpoint: str):
    import boto3
    import botocore.config

    cfg = botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                                 retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session(
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENV["AWS_DEFAULT_REGION"]).client("s3", endpoint_url=endpoint, config=cfg)


def put_objects(s3, bucket: str, objects: dict, threads: int = 8) -> None:
    """``objects``: key -> bytes, or key -> (bytes, metadata dict)."""
    def put(item):
        key, value = item
        body, meta = value if isinstance(value, tuple) else (value, None)
        args = {"Bucket": bucket, "Key": key, "Body": body}
        if meta:
            args["Metadata"] = meta
        s3.put_object(**args)

    items = list(objects.items())
    if len(items) <= 2:
        for it in items:
            put(it)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, items))


def put_many_small(endpoint: str, bucket: str, keys, body_of=lambda k: b"", threads: int = 6):
    """Many small PUTs straight over HTTP/1.1 keep-alive (moto does not check
    signatures): far cheaper on the client side than boto3 for 10,000 objects."""
    u = urllib.parse.urlsplit(endpoint)
    keys = list(keys)
    errors = []

    def worker(part):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        try:
            for key in part:
                path = f"/{bucket}/" + urllib.parse.quote(key, safe="/")
                for attempt in range(5):
                    try:
                        conn.request("PUT", path, body=body_of(key))
                        r = conn.getresponse()
                        r.read()
                        if r.status != 200:
                            raise OSError(f"PUT {key}: HTTP {r.status}")
                        break
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                        if attempt == 4:
                            raise
                        time.sleep(0.1)
        except Exception as e:
            errors.append(e)
        finally:
            conn.close()

    parts = [keys[i::threads] for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


# -- lustrefuse commands -------------------------------------------------------

def run(cmd, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env(),
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def lustrefuse(*args, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return run([LUSTREFUSE, *args], timeout=timeout)


def lfs(*args, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return run([LFS, *args], timeout=timeout)


def up_json(data_dir) -> dict | None:
    try:
        with open(Path(data_dir) / "up.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_IMPORT_LINE = re.compile(r"importing: (\d+) objects listed, (\d+) new, (\d+) changed, "
                          r"(\d+) deleted, (\d+) skipped")


def parse_import_summary(stderr: str) -> dict | None:
    found = _IMPORT_LINE.findall(stderr or "")
    if not found:
        return None
    listed, new, changed, deleted, skipped = map(int, found[-1])
    return {"listed": listed, "new": new, "changed": changed, "deleted": deleted,
            "skipped": skipped}


class UpFailed(AssertionError):
    pass


class FS:
    """One filesystem brought up by ``lustrefuse up``; see conftest.py for the fixtures."""

    def __init__(self, *, root: Path, bucket: str, prefix: str, endpoint: str, s3, osts: int,
                 stripe_size: str, extra_args=()):
        self.root = Path(root)
        self.mnt = self.root / "mnt"
        self.data_dir = self.root / "data"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self.s3 = s3
        self.osts = osts
        self.stripe_size = stripe_size
        self.extra_args = tuple(extra_args)
        self.up_result: subprocess.CompletedProcess | None = None
        self.imported: dict | None = None
        self.after_up: dict = {}  # snapshots taken by the fixture right after `up`
        self.seen_pids: set[int] = set()
        self.foreground: subprocess.Popen | None = None

    # -- paths and state -------------------------------------------------------

    @property
    def source(self) -> str:
        p = self.prefix.strip("/")
        return f"s3://{self.bucket}/{p}" if p else f"s3://{self.bucket}"

    def path(self, rel: str = "") -> str:
        return str(self.mnt / rel) if rel else str(self.mnt)

    @property
    def ctl(self) -> str:
        return os.path.join(self.path(), CTL)

    def up_args(self, extra=()) -> list[str]:
        return ["up", self.source, str(self.mnt), "--endpoint-url", self.endpoint,
                "--data-dir", str(self.data_dir), "--osts", str(self.osts),
                "--stripe-size", str(self.stripe_size), *self.extra_args, *extra]

    def pids(self) -> dict:
        """{"supervisor": pid, "mds": pid, "ost0": pid, ...} from DATA_DIR/up.json."""
        st = up_json(self.data_dir)
        if not st:
            return {}
        out = {"supervisor": st["supervisor"], **st.get("pids", {})}
        self.seen_pids.update(out.values())
        return out

    def mounted(self) -> bool:
        return is_mounted(self.mnt)

    def log(self, name: str) -> str:
        try:
            return (self.data_dir / "log" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted((self.data_dir / "log").glob("*.log")))

    def log_tails(self, n: int = 40) -> str:
        return log_tails(self.data_dir, n)

    # -- up / down ---------------------------------------------------------------

    def up(self, extra=(), check: bool = True) -> subprocess.CompletedProcess:
        r = lustrefuse(*self.up_args(extra), timeout=UP_TIMEOUT)
        self.up_result = r
        self.imported = parse_import_summary(r.stderr) or self.imported
        self.pids()
        if check and (r.returncode != 0 or not self.mounted()):
            raise UpFailed(f"lustrefuse up failed (rc={r.returncode}, mounted={self.mounted()})\n"
                           f"stdout: {r.stdout}\nstderr: {r.stderr}\n{self.log_tails()}")
        return r

    def up_again(self, extra=(), check: bool = True) -> subprocess.CompletedProcess:
        """``lustrefuse up`` on the same data dir and mountpoint."""
        return self.up(extra, check)

    def down(self, check: bool = True) -> subprocess.CompletedProcess:
        self.pids()
        r = lustrefuse("down", str(self.mnt), timeout=DOWN_TIMEOUT)
        if check and r.returncode != 0:
            raise AssertionError(f"lustrefuse down failed: {r.stderr}\n{self.log_tails()}")
        return r

    def cleanup(self) -> list[str]:
        """Stop everything, whatever state it is in. Returns notes on what had to be forced."""
        notes = []
        self.pids()
        if self.mounted():
            try:
                r = lustrefuse("down", str(self.mnt), timeout=DOWN_TIMEOUT)
                if r.returncode != 0:
                    notes.append(f"down failed: {r.stderr.strip()}")
            except subprocess.TimeoutExpired:
                notes.append("down timed out")
        if self.mounted():
            notes.append("still mounted after down: fusermount3 -u -z")
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True,
                           timeout=30)
        if self.foreground is not None and self.foreground.poll() is None:
            self.foreground.send_signal(signal.SIGTERM)
            try:
                self.foreground.wait(15)
            except subprocess.TimeoutExpired:
                notes.append("foreground up did not exit on SIGTERM")
                self.foreground.kill()
                self.foreground.wait(10)
        self.pids()
        # give an orderly shutdown a moment, then kill what is left
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not any(pid_alive(p) for p in self.seen_pids), 10, 0.1)
        left = [p for p in self.seen_pids if pid_alive(p)]
        left += [p for p in procs_mentioning(str(self.data_dir)) if p not in left]
        if left:
            notes.append(f"killed leftover pids {sorted(left)}")
            kill_pids(left)
        return notes

    # -- using it ------------------------------------------------------------------

    def stats(self) -> dict:
        """The counters ``lustrefuse stats --json`` prints (read from the control file)."""
        return json.loads(os.getxattr(self.ctl, "lustrefuse.stats"))

    def stats_cli(self) -> dict:
        r = lustrefuse("stats", self.path(), "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def lfs(self, *args, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the venv's ``lfs``; arguments that are relative paths stay as given, so
        callers usually pass ``fs.path(rel)``."""
        return lfs(*args, timeout=timeout)

    def request(self, action: str, *rel_paths, archive_id: int = 0) -> None:
        inos = [os.stat(self.path(r)).st_ino for r in rel_paths]
        req = {"action": action, "inos": inos}
        if archive_id:
            req["archive_id"] = archive_id
        os.setxattr(self.ctl, "lustrefuse.request", json.dumps(req).encode())

    def info(self, rel: str) -> dict:
        return json.loads(os.getxattr(self.path(rel), "lustrefuse.info"))

    def hsm_flags(self, rel: str) -> int:
        return self.info(rel)["hsm"]["flags"]

    def total(self, name: str) -> int:
        return self.stats()["total"][name]

    def ost_sum(self, name: str, stats: dict | None = None) -> int:
        st = stats or self.stats()
        return sum(int(o.get(name, 0)) for o in st["osts"].values())

    def wait_quiet(self, timeout: float = 30.0, settle: float = 0.6) -> dict:
        """Wait until no S3 traffic happens for ``settle`` seconds (prefetch done)."""
        deadline = time.monotonic() + timeout
        last = self.stats()
        quiet_since = time.monotonic()
        while True:
            time.sleep(0.1)
            cur = self.stats()
            if (cur["total"]["s3_requests"], self.ost_sum("chunks_hydrated", cur)) != (
                    last["total"]["s3_requests"], self.ost_sum("chunks_hydrated", last)):
                last, quiet_since = cur, time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                return cur
            if time.monotonic() > deadline:
                raise AssertionError("S3 traffic did not settle")

    def ost_objects_du(self) -> int:
        return sum(du(p / "objects") for p in self.data_dir.glob("ost*"))


def errno_of(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno))
