"""``lustrefuse demo``: a local S3 endpoint, a sample dataset, and the system shown at work.

The demo starts moto's S3 server on 127.0.0.1 (detached, so it outlives the
demo and the user can look around), uploads one large file and a few thousand
small ones, runs ``lustrefuse up`` and prints a table in the spirit of the FSx
for Lustre live demo: lazy first read against second read, ``hsm_restore`` of
the whole dataset, parallel readers, ``hsm_release``. Every byte read is
checked against the xxh3-128 digest taken when the data was generated.
``lustrefuse demo --stop`` stops the filesystem and the endpoint.

The helpers here (the endpoint, the dataset, readers, HSM requests through the
control file) are shared with ``lustrefuse bench``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import xxhash

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BUCKET = "lustrefuse-demo"
DEFAULT_BASE = "/tmp/lustrefuse-demo"
CTL = ".lustrefuse_ctl"
SEGMENT = 64 * MiB  # the large file's digests are kept per segment too
RELEASED, RESIDENT = 0xD, 0x9  # exists|archived|released, exists|archived


class DemoError(Exception):
    """A failure worth one clear line (and a non-zero exit)."""


class DataMismatch(DemoError):
    """Bytes read through the mount differ from the bytes uploaded."""


def say(msg: str = "", err: bool = False):
    stream = sys.stderr if err else sys.stdout
    stream.write(msg + "\n")
    stream.flush()


def aws_env(local: bool = True) -> dict:
    """The environment for S3 clients: dummy credentials (unless set) for a local
    endpoint; the usual credential chain, untouched, for a real one."""
    env = dict(os.environ)
    if local:
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return env


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} x {cpu}{mem}, Linux {platform.release()}, Python {platform.python_version()}"


def fmt_size(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:.1f} {unit}".replace(".0 ", " ")
    return f"{n:.0f} B"


def parse_size(text: str) -> int:
    from .layout import parse_size as _parse

    return _parse(text)


# -- the local S3 endpoint ----------------------------------------------------

def _patch_moto():
    """Serve ranged GETs without copying the whole object each time.

    Stock moto reads the object's full value (a copy) for every GET, ranged or
    not, so N ranged GETs of a large object cost N full copies: measured here,
    1 MiB ranges of a 512 MiB object came at 2 MB/s. Keeping the value as an
    immutable bytes object makes a ranged GET copy only its range.
    """
    from moto.s3.models import FakeKey

    if getattr(FakeKey, "_lustrefuse_patched", False):
        return
    get, put = FakeKey.value.fget, FakeKey.value.fset

    def fget(self):
        v = self.__dict__.get("_lf_value")
        if v is None:
            v = get(self)
            self.__dict__["_lf_value"] = v
        return v

    def fset(self, new):
        self.__dict__.pop("_lf_value", None)
        put(self, new)
        if isinstance(new, bytes):
            self.__dict__["_lf_value"] = new

    FakeKey.value = property(fget, fset)
    FakeKey._lustrefuse_patched = True
    _patch_bulk_put()


BULK_PUT_PATH = "/_lustrefuse/put-empty"


def _patch_bulk_put():
    """``POST /_lustrefuse/put-empty`` (body: the bucket, then one key a line) creates
    empty objects straight in moto's backend: 100,000 PUTs over HTTP take minutes on
    two vCPUs (~370 a second with 8 threads), this takes seconds. Only our own local
    endpoint has it; the bench uses it to build its 100,000-file walk tree."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication
    from moto.s3.models import s3_backends

    call = DomainDispatcherApplication.__call__

    def patched(self, environ, start_response):
        if environ.get("PATH_INFO") != BULK_PUT_PATH or environ.get("REQUEST_METHOD") != "POST":
            return call(self, environ, start_response)
        n = int(environ.get("CONTENT_LENGTH") or 0)
        lines = environ["wsgi.input"].read(n).decode().split("\n")
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        done = 0
        for key in lines[1:]:
            if key:
                backend.put_object(lines[0], key, b"")
                done += 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(done).encode()]

    DomainDispatcherApplication.__call__ = patched


def bulk_put_empty(endpoint_url: str, bucket: str, keys: list[str], batch: int = 20000) -> int:
    """Create empty objects on our local endpoint (see ``_patch_bulk_put``)."""
    import urllib.request

    done = 0
    for i in range(0, len(keys), batch):
        body = "\n".join([bucket, *keys[i:i + batch]]).encode()
        req = urllib.request.Request(endpoint_url + BULK_PUT_PATH, data=body, method="POST")
        with urllib.request.urlopen(req, timeout=600) as r:
            done += int(r.read())
    return done


def serve_endpoint(host: str, port: int):
    """Run moto's S3 server in this process (``python -m lustrefuse.demo serve-s3``)."""
    _patch_moto()
    from moto.server import main

    main(["-H", host, "-p", str(port)])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def s3_client(endpoint_url: str | None, threads: int = 64, local: bool = True):
    import boto3
    import botocore.config

    cfg = botocore.config.Config(max_pool_connections=threads, retries={"max_attempts": 5},
                                 connect_timeout=5, read_timeout=120,
                                 s3={"addressing_style": "path"},
                                 request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required")
    if local:
        env = aws_env(True)
        session = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                        region_name=env["AWS_DEFAULT_REGION"])
    else:
        session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, config=cfg,
                          region_name=session.region_name or "us-east-1")


def process_alive(pid: int, marker: str | None = None) -> bool:
    """Whether ``pid`` runs and (if given) its command line contains ``marker``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return marker is None or marker in cmd


def stop_pid(pid: int, marker: str | None = None, timeout: float = 10.0) -> bool:
    if not process_alive(pid, marker):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        try:
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    return True


@dataclass
class Endpoint:
    url: str
    pid: int | None = None  # None: an endpoint we did not start

    MARKER = "lustrefuse.demo serve-s3"

    @classmethod
    def start(cls, log_path: str, host: str = "127.0.0.1", timeout: float = 60.0) -> Endpoint:
        port = free_port(host)
        env = aws_env(True)
        env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 40)  # keep objects in memory
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lustrefuse.demo", "serve-s3", host,
                                     str(port)], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        ep = cls(f"http://{host}:{port}", proc.pid)
        s3 = s3_client(ep.url)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise DemoError(f"the S3 endpoint exited ({proc.returncode}); see {log_path}")
            try:
                s3.list_buckets()
                return ep
            except Exception:
                if time.monotonic() > deadline:
                    ep.stop()
                    raise DemoError(f"the S3 endpoint did not answer within {timeout:.0f}s; "
                                    f"see {log_path}") from None
                time.sleep(0.1)

    def stop(self) -> bool:
        return self.pid is not None and stop_pid(self.pid, self.MARKER)


# -- the dataset ----------------------------------------------------------------

@dataclass
class FileSpec:
    path: str  # relative to the mount root (= the S3 key)
    size: int
    digest: str  # xxh3_128 hex of the whole file
    segments: list = field(default_factory=list)  # xxh3_128 hex per SEGMENT (large files)


@dataclass
class Dataset:
    files: list[FileSpec]
    large: list[FileSpec]
    small: list[FileSpec]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict:
        return {"files": [f.__dict__ for f in self.files],
                "large": [f.path for f in self.large]}

    @classmethod
    def from_json(cls, d: dict) -> Dataset:
        files = [FileSpec(**f) for f in d["files"]]
        large = set(d["large"])
        return cls(files, [f for f in files if f.path in large],
                   [f for f in files if f.path not in large])


def _digest_segments(data) -> list[str]:
    mv = memoryview(data)
    return [xxhash.xxh3_128_hexdigest(mv[o:o + SEGMENT]) for o in range(0, len(mv), SEGMENT)]


def _local_copy(local_dir: str | None, path: str):
    if not local_dir:
        return None
    p = os.path.join(local_dir, path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return open(p, "wb")


def put_large(s3, bucket: str, path: str, size: int, key_prefix: str = "",
              local_dir: str | None = None, single_put_max: int = 4 * GiB) -> FileSpec:
    """One object of random bytes; one PUT up to 4 GiB (moto is fastest so), else
    multipart. With ``local_dir``, the same bytes are written there too."""
    key = key_prefix + path
    local = _local_copy(local_dir, path)
    try:
        if size <= single_put_max:
            data = os.urandom(size)
            spec = FileSpec(path, size, xxhash.xxh3_128_hexdigest(data), _digest_segments(data))
            if local:
                local.write(data)
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            return spec
        return _put_multipart(s3, bucket, path, key, size, local)
    finally:
        if local:
            local.close()


def _put_multipart(s3, bucket, path, key, size, local) -> FileSpec:
    whole = xxhash.xxh3_128()
    segs = []
    mpu = s3.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    try:
        for n, off in enumerate(range(0, size, SEGMENT), start=1):
            data = os.urandom(min(SEGMENT, size - off))
            whole.update(data)
            segs.append(xxhash.xxh3_128_hexdigest(data))
            if local:
                local.write(data)
            r = s3.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=n,
                               Body=data)
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                                     MultipartUpload={"Parts": parts})
    except BaseException:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"])
        raise
    return FileSpec(path, size, whole.hexdigest(), segs)


def small_paths(n: int, prefix: str = "small", per_dir: int = 100) -> list[str]:
    return [f"{prefix}/dir{i // per_dir:03d}/file{i:05d}.bin" for i in range(n)]


def make_dataset(s3, bucket: str, large_sizes: list[int], small_files: int,
                 small_min: int = 64 * KiB, small_max: int = 128 * KiB, threads: int = 16,
                 seed: int = 1, progress=None, large_prefix: str = "large",
                 small_prefix: str = "small", key_prefix: str = "", local_dir: str | None = None,
                 create_bucket: bool = True, single_put_max: int = 4 * GiB) -> Dataset:
    """Upload random data in parallel (objects ``key_prefix + path``); keep only digests,
    and with ``local_dir`` a local copy of every file for comparisons."""
    if create_bucket:
        try:
            s3.create_bucket(Bucket=bucket)
        except Exception as e:  # already there (a second run)
            if "BucketAlready" not in str(e):
                raise
    rng = random.Random(seed)
    sizes = [rng.randint(small_min, small_max) for _ in range(small_files)]
    done = [0, 0]
    lock = threading.Lock()

    def small(path, size):
        data = os.urandom(size)
        local = _local_copy(local_dir, path)
        if local:
            with local:
                local.write(data)
        s3.put_object(Bucket=bucket, Key=key_prefix + path, Body=data)
        with lock:
            done[0] += 1
            done[1] += size
        return FileSpec(path, size, xxhash.xxh3_128_hexdigest(data))

    def large(i, size):
        spec = put_large(s3, bucket, f"{large_prefix}/big{i}-{fmt_size(size).replace(' ', '')}.bin",
                         size, key_prefix, local_dir, single_put_max)
        with lock:
            done[0] += 1
            done[1] += size
        return spec

    total = len(large_sizes) + small_files
    with cf.ThreadPoolExecutor(threads) as ex:
        futs_large = [ex.submit(large, i, sz) for i, sz in enumerate(large_sizes)]
        paths = small_paths(small_files, small_prefix)
        futs_small = [ex.submit(small, p, sz) for p, sz in zip(paths, sizes, strict=True)]
        pending = set(futs_large + futs_small)
        while pending:
            finished, pending = cf.wait(pending, timeout=2.0, return_when=cf.FIRST_EXCEPTION)
            for f in finished:
                if f.exception():
                    for p in pending:
                        p.cancel()
                    raise f.exception()
            if progress and pending:
                progress(f"uploading: {done[0]}/{total} objects, {fmt_size(done[1])}")
        lg = [f.result() for f in futs_large]
        sm = [f.result() for f in futs_small]
    return Dataset(lg + sm, lg, sm)


# -- the filesystem -------------------------------------------------------------

def lustrefuse_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "lustrefuse", *args]


def fs_up(source: str, mountpoint: str, data_dir: str, endpoint_url: str | None,
          extra: list[str] = (), timeout: float = 900, local: bool = True) -> tuple[float, str]:
    """``lustrefuse up``; returns (seconds, stderr). Raises DemoError on failure."""
    os.makedirs(mountpoint, exist_ok=True)
    cmd = lustrefuse_cmd("up", source, mountpoint, "--data-dir", data_dir, *extra)
    if endpoint_url:
        cmd += ["--endpoint-url", endpoint_url]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=aws_env(local), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DemoError(f"'lustrefuse up' did not finish within {timeout:.0f}s") from None
    dt = time.perf_counter() - t0
    if r.returncode != 0 or not is_mounted(mountpoint):
        raise DemoError(f"'lustrefuse up' failed ({r.returncode}): "
                        f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return dt, r.stderr


def fs_down(mountpoint: str, data_dir: str | None = None) -> bool:
    cmd = lustrefuse_cmd("down", mountpoint, "--force")
    if data_dir:
        cmd += ["--data-dir", data_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    return r.returncode == 0


def is_mounted(mountpoint: str) -> bool:
    mp = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mp for line in f)


def up_state(data_dir: str) -> dict:
    try:
        with open(os.path.join(data_dir, "up.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def peak_rss(data_dir: str) -> dict[str, int]:
    """VmHWM (bytes) of each process of a running filesystem, from DATA_DIR/up.json."""
    out = {}
    for name, pid in sorted(up_state(data_dir).get("pids", {}).items()):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        out[name] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User plus system CPU seconds used so far by each process (gone ones left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


@contextlib.contextmanager
def cpu_used(pids: dict[str, int]):
    """Yields a dict filled, when the block ends, with the CPU seconds each of ``pids``
    used inside it."""
    used: dict[str, float] = {}
    before = cpu_seconds(pids)
    yield used
    after = cpu_seconds(pids)
    used.update({k: after[k] - before[k] for k in before if k in after})


def import_status(data_dir: str) -> dict | None:
    """The MDS's import status (start/finish times), or None if it cannot be asked."""
    try:
        from . import rpc

        c = rpc.Client(f"unix:{os.path.join(data_dir, 'mds.sock')}", timeout=10)
        try:
            return c.call("import_status")
        finally:
            c.close()
    except Exception:
        return None


def import_seconds(data_dir: str, up_stderr: str) -> float | None:
    st = import_status(data_dir)
    if st and st.get("finished") and st.get("started"):
        return st["finished"] - st["started"]
    for line in reversed(up_stderr.splitlines()):  # "importing: N objects listed ... (R/s)"
        if line.startswith("importing:") and "/s)" in line:
            try:
                listed = int(line.split()[1])
                rate = float(line.rsplit("(", 1)[1].split("/")[0].replace(",", ""))
                return listed / rate if rate else None
            except (ValueError, IndexError):
                return None
    return None


# -- HSM through the control file -------------------------------------------------

def info(path: str) -> dict:
    return json.loads(os.getxattr(path, "lustrefuse.info"))


def hsm_request(mountpoint: str, action: str, inos: list[int], batch: int = 5000):
    """One request per ``batch`` files (5,000 inode numbers fit in one xattr value)."""
    ctl = os.path.join(mountpoint, CTL)
    for i in range(0, len(inos), batch):
        os.setxattr(ctl, "lustrefuse.request",
                    json.dumps({"action": action, "inos": inos[i:i + batch]}).encode())


def wait_hsm(paths: list[str], flags: int, timeout: float, progress=None,
             poll: float = 0.1) -> list[str]:
    """Poll until every file's action is NOOP and its HSM flags are ``flags``.
    Returns the paths still not there when ``timeout`` ran out (empty: all done)."""
    pending = list(paths)
    deadline = time.monotonic() + timeout
    last = 0.0
    while pending:
        still = []
        for i, p in enumerate(pending):
            inf = info(p)
            if inf["action"]["action"] != "NOOP" or inf["hsm"]["flags"] != flags:
                still = pending[i:]  # files finish roughly in request order
                break
        pending = still
        if not pending:
            break
        now = time.monotonic()
        if now > deadline:
            pending = [p for p in pending if (lambda i: i["action"]["action"] != "NOOP"
                                              or i["hsm"]["flags"] != flags)(info(p))]
            break
        if progress and now - last > 2.0:
            last = now
            progress(len(paths) - len(pending), len(paths))
        time.sleep(poll)
    return pending


def drop_file_cache(path: str):
    """Drop one file's clean pages from the page cache (no global effect)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- readers ------------------------------------------------------------------------

_tls = threading.local()


def _buffer(size: int) -> memoryview:
    buf = getattr(_tls, "buf", None)
    if buf is None or len(buf) < size:
        buf = _tls.buf = memoryview(bytearray(size))
    return buf


def read_range(path: str, offset: int = 0, length: int | None = None,
               bufsize: int = MiB) -> tuple[int, str, int, float]:
    """Read [offset, offset+length) of ``path``; returns (bytes, xxh3_128 hex, reads,
    seconds to the first read)."""
    h = xxhash.xxh3_128()
    buf = _buffer(bufsize)
    n = reads = 0
    first = 0.0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        remaining = length
        pos = offset
        while remaining is None or remaining > 0:
            want = bufsize if remaining is None else min(bufsize, remaining)
            got = os.preadv(fd, [buf[:want]], pos)
            reads += 1
            if reads == 1:
                first = time.perf_counter() - t0
            if got == 0:
                break
            h.update(buf[:got])
            n += got
            pos += got
            if remaining is not None:
                remaining -= got
    finally:
        os.close(fd)
    return n, h.hexdigest(), reads, first


@dataclass
class ReadResult:
    seconds: float
    bytes: int
    reads: int
    files: int
    mismatches: list = field(default_factory=list)
    first_read: float = 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def iops(self) -> float:
        return self.reads / self.seconds if self.seconds else 0.0

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0


def read_file_checked(root: str, spec: FileSpec, bufsize: int = MiB) -> ReadResult:
    t0 = time.perf_counter()
    n, digest, reads, first = read_range(os.path.join(root, spec.path), bufsize=bufsize)
    dt = time.perf_counter() - t0
    bad = [spec.path] if (n, digest) != (spec.size, spec.digest) else []
    return ReadResult(dt, n, reads, 1, bad, first)


def work_items(files: list[FileSpec]) -> list[tuple[FileSpec, int, int, str]]:
    """Files cut into (spec, offset, length, digest) items: large ones per segment."""
    items = []
    for f in files:
        if f.segments:
            for i, d in enumerate(f.segments):
                items.append((f, i * SEGMENT, min(SEGMENT, f.size - i * SEGMENT), d))
        else:
            items.append((f, 0, f.size, f.digest))
    return items


def parallel_read(root: str, files: list[FileSpec], threads: int,
                  bufsize: int = MiB) -> ReadResult:
    """``threads`` readers over ``files`` (large ones in segments), every item verified."""
    items = work_items(files)
    items.sort(key=lambda it: -it[2])  # big pieces first: the tail stays short
    lock = threading.Lock()
    it = iter(items)
    totals = [0, 0]
    bad = []

    def worker():
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            spec, off, length, digest = item
            n, d, reads, _ = read_range(os.path.join(root, spec.path), off, length, bufsize)
            with lock:
                totals[0] += n
                totals[1] += reads
                if (n, d) != (length, digest):
                    bad.append(f"{spec.path}@{off}")

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return ReadResult(time.perf_counter() - t0, totals[0], totals[1], len(files), bad)


# -- the demo itself ----------------------------------------------------------------

def _cmd(name: str) -> str:
    """How the user can call one of our console scripts: bare if on PATH, else in full."""
    mine = os.path.join(os.path.dirname(sys.executable), name)
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(mine):
        return name
    return mine if os.path.exists(mine) else name


def _state_path(base: str) -> str:
    return os.path.join(base, "demo.json")


def load_state(base: str) -> dict:
    try:
        with open(_state_path(base)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_state(base: str, state: dict):
    tmp = _state_path(base) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.rename(tmp, _state_path(base))


def stop(base: str = DEFAULT_BASE, quiet: bool = False, remove_data: bool = True) -> bool:
    """Stop a demo: unmount and stop the filesystem, stop the endpoint, drop its data."""
    state = load_state(base)
    if not state:
        if not quiet:
            say(f"no demo is running from {base}")
        return False
    mnt, data = state.get("mountpoint"), state.get("data_dir")
    if mnt and (is_mounted(mnt) or up_state(data or "")):
        if fs_down(mnt, data):
            if not quiet:
                say(f"stopped the filesystem on {mnt}")
        elif not quiet:
            say(f"could not stop the filesystem on {mnt}; try: lustrefuse down --force {mnt}")
    pid = state.get("endpoint_pid")
    if pid and stop_pid(pid, Endpoint.MARKER) and not quiet:
        say(f"stopped the S3 endpoint {state.get('endpoint_url')} (pid {pid})")
    if remove_data and data and _is_demo_data(data) and not is_mounted(mnt or ""):
        shutil.rmtree(data, ignore_errors=True)
    try:
        os.unlink(_state_path(base))
    except FileNotFoundError:
        pass
    return True


def _is_demo_data(data_dir: str) -> bool:
    """Only ever delete a data directory that this demo created."""
    try:
        with open(os.path.join(data_dir, "fs.json")) as f:
            return json.load(f).get("bucket") == BUCKET
    except (OSError, ValueError):
        return not os.path.exists(data_dir) or not os.listdir(data_dir)


def _preflight(mountpoint: str):
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing (a container needs --device /dev/fuse "
                        "--cap-add SYS_ADMIN)")
    if not shutil.which("fusermount3"):
        problems.append("fusermount3 is missing (apt-get install fuse3)")
    if problems:
        raise DemoError("; ".join(problems))
    if is_mounted(mountpoint):
        raise DemoError(f"{mountpoint} is already a mount point (lustrefuse down {mountpoint})")
    if os.path.isdir(mountpoint) and os.listdir(mountpoint):
        raise DemoError(f"mountpoint {mountpoint} is not empty")


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, step: str, seconds: float | None, rate: str):
        self.rows.append((step, "" if seconds is None else f"{seconds:,.2f} s", rate))
        say(f"  {step:<44} {self.rows[-1][1]:>10}  {rate}")

    def render(self) -> str:
        w0 = max(len(r[0]) for r in self.rows + [("step", "", "")])
        w1 = max(len(r[1]) for r in self.rows + [("", "time", "")])
        lines = [f"{'step':<{w0}}  {'time':>{w1}}  result", f"{'-' * w0}  {'-' * w1}  {'-' * 30}"]
        lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in self.rows]
        return "\n".join(lines)


def run(base: str = DEFAULT_BASE, mountpoint: str | None = None, data_dir: str | None = None,
        large_size: int = 512 * MiB, small_files: int = 2000, readers: int = 8, osts: int = 2,
        stripe_size: str = "1M", imported_chunk: str = "64M", keep_running: bool = True,
        restore_timeout: float = 600.0) -> int:
    if not large_size and not small_files:
        raise DemoError("nothing to show: give --large-size or --small-files")
    base = os.path.abspath(base)
    mnt = os.path.abspath(mountpoint or os.path.join(base, "mnt"))
    data = os.path.abspath(data_dir or os.path.join(base, "data"))
    os.makedirs(base, exist_ok=True)
    if load_state(base):
        say(f"stopping the previous demo in {base}")
        stop(base, quiet=True)
    if os.path.exists(data) and not _is_demo_data(data):
        raise DemoError(f"{data} holds something else than this demo's data; give --data-dir")
    _preflight(mnt)
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(mnt, exist_ok=True)
    say(f"lustrefuse demo on {machine_info()}")

    state = {"mountpoint": mnt, "data_dir": data, "base": base}
    ep = Endpoint.start(os.path.join(base, "s3.log"))
    state.update(endpoint_url=ep.url, endpoint_pid=ep.pid)
    save_state(base, state)
    ok = False
    try:
        code = _run(ep, base, mnt, data, large_size, small_files, readers, osts, stripe_size,
                    imported_chunk, restore_timeout, keep_running)
        ok = True
        return code
    finally:
        if not ok or not keep_running:
            if not ok:
                say(f"the demo failed; logs are in {data}/log and {base}/s3.log; "
                    "stopping what it started", err=True)
            stop(base, quiet=True, remove_data=ok)


def _run(ep: Endpoint, base, mnt, data, large_size, small_files, readers, osts, stripe_size,
         imported_chunk, restore_timeout, keep_running) -> int:
    s3 = s3_client(ep.url)
    say(f"S3 endpoint: moto on {ep.url} (pid {ep.pid}), bucket s3://{BUCKET}")
    t0 = time.perf_counter()
    ds = make_dataset(s3, BUCKET, [large_size] if large_size else [], small_files,
                      progress=lambda m: say("  " + m))
    dt = time.perf_counter() - t0
    with open(os.path.join(base, "manifest.json"), "w") as f:
        json.dump(ds.to_json(), f)
    big = f"1 large file ({fmt_size(large_size)})" if ds.large else "no large file"
    say(f"dataset: {big} + {len(ds.small)} small files (64-128 KiB) = "
        f"{ds.total_bytes / 1e6:,.0f} MB, uploaded in {dt:.1f}s")

    say(f"\nlustrefuse up s3://{BUCKET} {mnt} --osts {osts} ...")
    up_s, err = fs_up(f"s3://{BUCKET}", mnt, data, ep.url,
                      ["--osts", str(osts), "--stripe-size", stripe_size,
                       "--imported-file-chunk-size", imported_chunk])
    imp = import_seconds(data, err) or up_s
    n_obj = len(ds.files)
    say("")
    table = Table()
    table.add(f"up: import {n_obj:,} objects, mount", up_s,
              f"import {imp:.2f} s = {n_obj / imp:,.0f} objects/s (metadata only)")
    mismatches: list[str] = []

    if ds.large:
        big = ds.large[0]
        r1 = read_file_checked(mnt, big)
        mismatches += r1.mismatches
        table.add(f"large file, 1st read (lazy from S3, {fmt_size(big.size)})", r1.seconds,
                  f"{r1.mbps:,.0f} MB/s, first MiB after {r1.first_read * 1000:,.0f} ms")
        r2 = read_file_checked(mnt, big)
        mismatches += r2.mismatches
        table.add("large file, 2nd read (local)", r2.seconds,
                  f"{r2.mbps:,.0f} MB/s ({r2.mbps / max(r1.mbps, 1e-9):,.1f}x the 1st read)")

    paths = [os.path.join(mnt, f.path) for f in ds.files]
    inos = [os.stat(p).st_ino for p in paths]
    # the large file was hydrated by reading it: release it so the restore moves everything
    big_inos = [os.stat(os.path.join(mnt, f.path)).st_ino for f in ds.large]
    hsm_request(mnt, "release", big_inos)

    t0 = time.perf_counter()
    hsm_request(mnt, "restore", inos)
    left = wait_hsm(paths, RESIDENT, restore_timeout,
                    progress=lambda d, n: say(f"    restoring: {d:,}/{n:,} files"))
    dt = time.perf_counter() - t0
    if left:
        raise DemoError(f"hsm_restore: {len(left)} files not restored after "
                        f"{restore_timeout:.0f}s, e.g. {left[0]}")
    table.add(f"hsm_restore, whole dataset ({ds.total_bytes / 1e6:,.0f} MB)", dt,
              f"{ds.total_bytes / dt / 1e6:,.0f} MB/s, {len(paths) / dt:,.0f} files/s")

    for f in ds.large:  # its pages from the 2nd read: make the readers go through the daemon
        drop_file_cache(os.path.join(mnt, f.path))
    r = parallel_read(mnt, ds.files, readers)
    mismatches += r.mismatches
    table.add(f"{readers} parallel readers, all files (hydrated)", r.seconds,
              f"{r.mbps:,.0f} MB/s, {r.iops:,.0f} IOPS (reads of <=1 MiB), "
              f"{r.files_per_s:,.0f} files/s")

    t0 = time.perf_counter()
    hsm_request(mnt, "release", inos)
    dt = time.perf_counter() - t0
    left = wait_hsm(paths, RELEASED, 60)
    if left:
        raise DemoError(f"hsm_release: {len(left)} files still resident, e.g. {left[0]}")
    table.add(f"hsm_release, all {len(paths):,} files", dt,
              f"{len(paths) / dt:,.0f} files/s; local data dropped, S3 copy kept")

    say("")
    say(table.render())
    total_read = (2 * sum(f.size for f in ds.large)) + r.bytes
    if mismatches:
        raise DataMismatch(f"DATA MISMATCH in {len(mismatches)} reads, e.g. {mismatches[:5]}")
    say(f"\nverified: every byte read ({total_read / 1e6:,.0f} MB) matches the uploaded data "
        "(xxh3-128)")
    rss = peak_rss(data)
    if rss:
        say("peak RSS: " + ", ".join(f"{k} {v / MiB:,.0f} MiB" for k, v in rss.items()))
    if keep_running:
        lfs, lf = _cmd("lfs"), _cmd("lustrefuse")
        stop_cmd = f"{lf} demo --stop" + (f" --dir {base}" if base != DEFAULT_BASE else "")
        say(f"""
The filesystem stays mounted so you can look around:
  ls {mnt}/small/dir000 | head
  {lfs} hsm_state {mnt}/{ds.files[0].path}
  cat {mnt}/{ds.files[-1].path} > /dev/null; {lfs} hsm_state {mnt}/{ds.files[-1].path}
  {lfs} hsm_restore {mnt}/{ds.files[0].path}; {lfs} hsm_action {mnt}/{ds.files[0].path}
  {lf} stats {mnt}
The S3 endpoint keeps running in the background: {ep.url} (moto, pid {ep.pid}, log {base}/s3.log;
  any S3 client works with that endpoint URL, bucket {BUCKET}, credentials testing/testing).
Stop everything (filesystem, endpoint, demo data):
  {stop_cmd}
(or just the filesystem: {lf} down {mnt})""")
    else:
        say("\nstopping the filesystem and the endpoint (--no-keep-running)")
    return 0


def _interrupt(_sig, _frame):
    raise KeyboardInterrupt


def guarded(prog: str, fn, *args, **kw) -> int:
    """Run ``fn`` with SIGTERM handled as Ctrl-C (so cleanup runs); map failures to
    exit codes: 3 data mismatch, 1 failure, 130 interrupted."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn(*args, **kw)
    except DataMismatch as e:
        say(f"{prog}: DATA MISMATCH: {e}", err=True)
        return 3
    except DemoError as e:
        say(f"{prog}: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        say(f"{prog}: interrupted", err=True)
        return 130


def main_cli(**kw) -> int:
    """Entry for the click command in cli.py."""
    base = kw.pop("base")
    if kw.pop("stop_demo"):
        stop(base)
        return 0
    try:
        import moto.server  # noqa: F401
    except ImportError:
        say("lustrefuse demo: the local S3 endpoint needs moto: pip install 'moto[server]' "
            "(or: pip install -e '.[test]')", err=True)
        return 1
    return guarded("lustrefuse demo", run, base, **kw)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve-s3":
        serve_endpoint(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m lustrefuse.demo serve-s3 HOST PORT (use `lustrefuse demo`)")
