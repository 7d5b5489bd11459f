"""Running the parts: the MDS, OST and mount daemons, and the ``up`` supervisor.

``up`` starts a supervisor process (in the background, or attached with
``--foreground``) that starts the MDS, the OSTs, runs the import and mounts.
It stops everything when the mount goes away (``lustrefuse down``, plain
``umount``) or on SIGTERM, and leaves the others running when one part dies,
so that reads fail with EIO rather than hang; ``up`` again on the same data
directory restarts what is missing.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from . import rpc
from .protocol import RpcError

log = logging.getLogger(__name__)


def sd_notify(message: str = "READY=1"):
    """systemd's readiness protocol, without a dependency on libsystemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


class JsonFormatter(logging.Formatter):
    """One JSON object per line (LUSTREFUSE_LOG_FORMAT=json), for log shippers."""

    def format(self, record):
        out = {"time": self.formatTime(record), "level": record.levelname.lower(),
               "logger": record.name, "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", path: str | None = None):
    handlers = [logging.FileHandler(path)] if path else [logging.StreamHandler()]
    if os.environ.get("LUSTREFUSE_LOG_FORMAT") == "json":
        for h in handlers:
            h.setFormatter(JsonFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=handlers,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
                        force=True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def wait_signal_or(event: threading.Event):
    """Block until SIGTERM/SIGINT or ``event``."""
    def stop(_sig, _frame):
        event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not event.wait(0.5):
        pass


# -- the daemons -----------------------------------------------------------

def tune_malloc(arenas: int = 2, keep: int = 64 << 20):
    """Keep freed memory for reuse instead of handing it back to the kernel.

    - A couple of heaps shared between threads. By default each of our many threads
      (GETs, RPC handlers, FUSE reads) gets its own heap, and the multi-MiB buffers they
      free stay in those heaps: RSS then grows with the thread count, not with the work
      (measured: OSTs at 300 MiB with a 64 MiB GET budget, 220 MiB with two heaps).
    - Buffers up to 32 MiB come from those heaps, and up to ``keep`` bytes of free heap
      are kept. Otherwise every 1 MiB chunk read is a fresh mapping or a re-grown heap,
      and fresh pages are costly on VMs whose host takes back freed guest memory: first
      touches cost 1-2 s of CPU per GiB (measured in the mount: 28% of its CPU in a cold
      read was copying into just-allocated buffers)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (also ends its dynamic growth)
        libc.mallopt(-1, keep)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def start_metrics(address: str | None, gauges: dict | None = None):
    """Opt-in Prometheus endpoint; ``gauges`` maps a name to a callable read at scrape time."""
    if not address:
        return
    from .metrics import REGISTRY, serve

    for name, (fn, help_text) in (gauges or {}).items():
        REGISTRY.gauge(name, fn, help_text)
    serve(address)
    log.info("metrics on http://%s/metrics", address)


def run_mds(data_dir: str, listen: str | None, secret: bytes | None, metrics: str | None = None):
    from .mds import Mds, take_lock

    tune_malloc()
    lock_fd = take_lock(os.path.join(data_dir, "mds.lock"))
    with open(os.path.join(data_dir, "fs.json")) as f:
        config = json.load(f)
    config["secret"] = secret
    address = listen or f"unix:{os.path.join(data_dir, 'mds.sock')}"
    handlers: dict = {}
    server = rpc.Server(address, handlers, secret)  # bad addresses fail before threads start
    mds = Mds(data_dir, config)
    handlers.update(mds.handlers())
    server.on_disconnect = mds.on_disconnect
    server.role = "mds"

    def queue():
        rows = mds.ns.db.execute("SELECT action, state, count(*) FROM hsm_requests "
                                 "WHERE state IN ('WAITING','STARTED') GROUP BY 1, 2").fetchall()
        return {(("action", a), ("state", st)): n for a, st, n in rows} or {(): 0}

    start_metrics(metrics, {
        "mds_inodes": (lambda: {(): mds.ns.counts()["inodes"]}, "inodes in the namespace"),
        "mds_open_files": (lambda: {(): len(mds.opens)}, "files open by clients"),
        "hsm_queue_depth": (queue, "HSM requests waiting or running"),
    })
    mds.recover()
    server.start()
    threading.Thread(target=mds.auto_import_loop, name="auto-import", daemon=True).start()
    threading.Thread(target=mds.lease_loop, name="leases", daemon=True).start()
    log.info("MDS serving %s on %s", data_dir, server.address)
    sd_notify()
    stop = threading.Event()
    wait_signal_or(stop)
    log.info("MDS stopping")
    server.shutdown()
    mds.close()
    os.close(lock_fd)


def run_ost(index: int, directory: str, mds_address: str, listen: str | None,
            secret: bytes | None, endpoint_url: str | None = None, capacity: int = 0,
            low_watermark: float = 0.0, high_watermark: float = 0.0, metrics: str | None = None,
            hydrate_budget: int = 64 << 20):
    from .ost import ObjectStore, OstService
    from .s3 import Repository

    tune_malloc()
    os.makedirs(directory, exist_ok=True)
    store = ObjectStore(directory, index, capacity)
    mds = rpc.Client(mds_address, secret, timeout=30)
    address = listen or f"unix:{os.path.join(directory, 'ost.sock')}"
    service = OstService(store, mds, None, hydrate_budget=hydrate_budget,
                         low_watermark=low_watermark,
                         high_watermark=high_watermark)
    server = rpc.Server(address, service.handlers(), secret, role=f"ost{index}")
    server.start()

    def s3_counter(name):
        return lambda: {(("ost", index),): getattr(service.repo.counters, name)
                        if service.repo else 0}

    start_metrics(metrics, {
        "ost_used_bytes": (lambda: {(("ost", index),): store.used}, "bytes of chunks held"),
        "ost_free_bytes": (lambda: {(("ost", index),): store.free_bytes()}, "room for chunks"),
        "hydration_inflight": (lambda: {(("ost", index),): len(service.inflight)},
                               "chunks being fetched from S3"),
        "s3_bytes_in": (s3_counter("bytes_in"), "bytes fetched from S3"),
        "s3_errors": (s3_counter("errors"), "S3 requests that failed"),
        "s3_requests": (s3_counter("requests"), "S3 requests made"),
    })
    repo_cfg = None
    for attempt in range(100):
        try:
            repo_cfg = mds.call("register_ost", index=index, address=server.address)
            break
        except (OSError, RpcError) as e:
            if attempt == 99:
                raise SystemExit(f"OST {index}: cannot register with the MDS: {e}") from None
            time.sleep(0.1)
    if repo_cfg.get("bucket"):
        service.repo = Repository(repo_cfg["bucket"], endpoint_url or repo_cfg.get("endpoint_url"))
    service.ready = True
    log.info("OST %d serving %s on %s", index, directory, server.address)
    sd_notify()
    stop = threading.Event()
    wait_signal_or(stop)
    log.info("OST %d stopping", index)
    server.shutdown()
    service.close()


def set_read_ahead(mountpoint: str, kb: int = 1024):
    """Let the kernel send 1 MiB read requests (pyfuse3 cannot negotiate it)."""
    mp = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == mp and " - fuse" in line:
                    with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as ra:
                        ra.write(str(kb))
                    return True
    except OSError as e:
        log.info("cannot raise read_ahead_kb: %s", e)
    return False


def run_mount(mds_address: str, mountpoint: str, secret: bytes | None, attr_timeout: float,
              data_dir: str | None, options: list[str], allow_other: bool | None = None,
              metrics: str | None = None):
    import pyfuse3
    import trio

    from .client import Filesystem, serve

    tune_malloc()
    try:  # one clear line, before anything is mounted, when the MDS is not there
        rpc.Client(mds_address, secret, timeout=10).call("ping")
    except (OSError, RpcError, ConnectionError) as e:
        raise SystemExit(f"lustrefuse: cannot reach the MDS at {mds_address}: {e}") from None
    fs = Filesystem(mds_address, secret, attr_timeout, data_dir)
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname={data_dir or 'lustrefuse'}", "subtype=lustrefuse", "noatime"}
    if allow_other if allow_other is not None else os.geteuid() == 0:
        opts.add("allow_other")
    opts |= set(o for o in options if o)

    def ready():
        time.sleep(0.05)
        set_read_ahead(mountpoint)
        sd_notify()

    def hit_ratio():
        c = fs.counters
        total = c.get("chunk_hits", 0) + c.get("chunk_misses", 0)
        return {(): c.get("chunk_hits", 0) / total if total else 1.0}

    start_metrics(metrics, {"chunk_hit_ratio": (hit_ratio, "reads served by local chunks")})
    if metrics:
        from .metrics import REGISTRY

        for name in ("reads", "bytes_read", "bytes_written", "bytes_from_ost", "hydrate_calls",
                     "prefetched_chunks", "chunk_hits", "chunk_misses", "checksum_failures"):
            REGISTRY.gauge("client_" + name, lambda n=name: {(): fs.counters.get(n, 0)},
                           f"client {name.replace('_', ' ')}", kind="counter")
    log.info("mounting %s on %s", mds_address, mountpoint)
    try:
        trio.run(serve, fs, mountpoint, opts, ready)
    except BaseException as e:
        log.exception("the mount failed")
        errors = e.exceptions if isinstance(e, BaseExceptionGroup) else [e]
        raise SystemExit(f"lustrefuse: mount of {mountpoint} failed: "
                         + "; ".join(str(x) or type(x).__name__ for x in errors)) from None
    log.info("unmounted %s", mountpoint)


# -- up / down -------------------------------------------------------------

def is_mounted(mountpoint: str) -> bool:
    mp = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mp for line in f)


def unmount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    return subprocess.run(cmd, capture_output=True, text=True)


def mount_data_dir(mountpoint: str) -> str | None:
    """The data directory of a lustrefuse mount, from its source field."""
    mp = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mp:
                sep = fields.index("-")
                if fields[sep + 1] == "fuse.lustrefuse":
                    return fields[sep + 2].replace("\\040", " ")
    return None


def _spawn(args: list[str], log_path: str) -> subprocess.Popen:
    out = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "lustrefuse", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        out.close()


def _tail(path: str, n: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


class Supervisor:
    """Starts and watches the MDS, the OSTs and the mount for one data directory."""

    def __init__(self, data_dir: str, mountpoint: str, config: dict, args: dict):
        self.data_dir = data_dir
        self.mountpoint = os.path.abspath(mountpoint)
        self.config = config
        self.args = args
        self.logs = os.path.join(data_dir, "log")
        os.makedirs(self.logs, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.stop = threading.Event()
        self.restart = threading.Event()
        self.mds_address = f"unix:{os.path.join(data_dir, 'mds.sock')}"

    def _state(self):
        state = {"supervisor": os.getpid(), "mountpoint": self.mountpoint,
                 "pids": {k: p.pid for k, p in self.procs.items()}}
        tmp = os.path.join(self.data_dir, "up.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.rename(tmp, os.path.join(self.data_dir, "up.json"))

    def _start(self, name: str, args: list[str]):
        self.procs[name] = _spawn(args, os.path.join(self.logs, f"{name}.log"))
        self._state()

    def _wait(self, name: str, check, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.procs[name]
            if p.poll() is not None:
                raise SystemExit(f"{name} exited ({p.returncode}): "
                                 f"{_tail(os.path.join(self.logs, name + '.log'))}")
            try:
                if check():
                    return
            except (OSError, RpcError):
                pass
            time.sleep(0.05)
        raise SystemExit(f"{name} did not become ready within {timeout:.0f}s")

    def _metrics_args(self, offset: int) -> list[str]:
        port = self.args.get("metrics_port")
        return ["--metrics", f"127.0.0.1:{port + offset}"] if port else []

    def start_mds(self):
        self._start("mds", ["mds", "--data-dir", self.data_dir, "--log-level",
                            self.args.get("log_level", "info"), *self._metrics_args(0)])
        c = rpc.Client(self.mds_address, timeout=2)
        self._wait("mds", lambda: c.call("ping") is not None)
        c.close()

    def start_osts(self, indexes):
        """Start OSTs together (each spends most of a second importing boto3), then wait."""
        for i in indexes:
            d = os.path.join(self.data_dir, f"ost{i}")
            extra = []
            for opt in ("capacity", "hydrate_budget", "low_watermark", "high_watermark"):
                if self.config.get(opt):
                    extra += ["--" + opt.replace("_", "-"), str(self.config[opt])]
            self._start(f"ost{i}", ["ost", "--index", str(i), "--dir", d, "--mds",
                                    self.mds_address, "--log-level",
                                    self.args.get("log_level", "info"), *extra,
                                    *self._metrics_args(2 + i)])
        c = rpc.Client(self.mds_address, timeout=2)
        for i in indexes:
            sock = f"unix:{os.path.join(self.data_dir, f'ost{i}', 'ost.sock')}"
            self._wait(f"ost{i}", lambda i=i, sock=sock: str(i) in c.call("config")["osts"]
                       and rpc.Client(sock, timeout=2).call("ping") is not None)
        c.close()

    def start_mount(self):
        args = ["mount", self.mds_address, self.mountpoint, "--data-dir", self.data_dir,
                "--attr-timeout", str(self.args.get("attr_timeout", 10.0)),
                "--log-level", self.args.get("log_level", "info"), *self._metrics_args(1)]
        for o in self.args.get("options") or ():
            args += ["-o", o]
        self._start("mount", args)
        self._wait("mount", lambda: is_mounted(self.mountpoint), timeout=30)

    def run_import(self, progress):
        c = rpc.Client(self.mds_address, timeout=30)
        c.call("import_start", posix_metadata=self.args.get("posix_metadata", True))
        while True:
            st = c.call("import_status")
            progress(st)
            if st["state"] in ("done", "failed", "canceled"):
                break
            time.sleep(0.2)
        c.close()
        if st["state"] != "done":
            raise SystemExit(f"import failed: {st.get('error') or st['state']}")
        return st

    def bring_up(self, progress):
        self.start_mds()
        self.start_osts(range(self.config["osts"]))
        if self.args.get("import", True):
            self.run_import(progress)
        self.start_mount()

    def teardown(self):
        if is_mounted(self.mountpoint):
            r = unmount(self.mountpoint)
            if r.returncode != 0:
                unmount(self.mountpoint, lazy=True)
        # the MDS goes before the OSTs so that its coordinator never sees them vanish
        order = ["mount", "mds"] + sorted(k for k in self.procs if k.startswith("ost"))
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        try:
            os.unlink(os.path.join(self.data_dir, "up.json"))
        except FileNotFoundError:
            pass

    def watch(self):
        """Until the mount is gone or we are told to stop; restart parts on SIGHUP."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.restart.set())
        reported = set()
        while not self.stop.wait(0.2):
            if self.procs["mount"].poll() is not None:
                log.info("the mount has exited; stopping the services")
                break
            for name, p in self.procs.items():
                if p.poll() is not None and name not in reported:
                    reported.add(name)
                    log.error("%s died (exit %s); reads that need it fail with EIO until "
                              "'lustrefuse up' restarts it", name, p.returncode)
            if self.restart.is_set():
                self.restart.clear()
                self.restart_dead()
                reported.clear()
        self.teardown()

    def restart_dead(self):
        if self.procs["mds"].poll() is not None:
            log.info("restarting the MDS")
            self.start_mds()
        dead = [i for i in range(self.config["osts"]) if self.procs[f"ost{i}"].poll() is not None]
        if dead:
            log.info("restarting OSTs %s", dead)
            self.start_osts(dead)


def supervisor_alive(data_dir: str) -> dict | None:
    try:
        with open(os.path.join(data_dir, "up.json")) as f:
            state = json.load(f)
        os.kill(state["supervisor"], 0)
        return state
    except (OSError, ValueError, KeyError):
        return None
