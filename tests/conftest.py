"""Fixtures for lustrefuse tests: a real moto S3 server over HTTP and real mounts.

Fixtures (other test files rely on exactly these names):

``s3_server`` (session)
    Starts the venv's ``moto_server`` on 127.0.0.1 and a free port, with
    ``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE`` = 1 GiB so objects stay in memory and ranged
    GETs are cheap. Yields the endpoint URL (``http://127.0.0.1:PORT``); killed at
    the end of the session.
``s3`` (session)
    A boto3 S3 client for that endpoint (path-style addressing, test credentials).
``bucket`` (function)
    A fresh, uniquely named, empty bucket; yields its name.
``make_fs`` (function)
    Factory ``make_fs(bucket, prefix="", osts=2, stripe_size="1M", extra_args=(),
    objects=None, up=True) -> helpers.FS``. Puts ``objects`` (key relative to
    ``prefix`` -> bytes, or -> (bytes, metadata dict)) into the bucket, then (unless
    ``up=False``: build the FS, start it yourself) runs ``lustrefuse up`` on a fresh
    mountpoint + data dir and returns an :class:`helpers.FS` with ``mnt``,
    ``data_dir``, ``bucket``, ``prefix``, ``endpoint``, ``s3`` and ``path(rel)``,
    ``stats()``, ``lfs(*args)``, ``request(action, *rel)``, ``info(rel)``, ``down()``,
    ``up_again()``, ``pids()``, ``hsm_flags(rel)``, ``total(name)``, ``wait_quiet()``,
    ``log(name)`` ... ``stats()`` is the JSON ``lustrefuse stats --json`` prints, read
    straight from the control file (``stats_cli()`` runs the command).
    ``fs.imported`` is the import summary of the last ``up`` (listed/new/changed/deleted/
    skipped). ``fs.after_up["stats"]`` is the stats snapshot taken
    right after ``up`` (before any test touched the mount). Teardown always cleans
    up, even after a failure: ``lustrefuse down``, then ``fusermount3 -u -z`` if
    still mounted, then SIGKILL for any pid ever listed in DATA_DIR/up.json (and any
    process whose command line names the test's own data dir).
``make_module_fs`` (module)
    The same factory, module-scoped, for filesystems shared by read-only tests.
``fs`` (function)
    ``make_fs(bucket, objects=DEFAULT_OBJECTS)``: 2 OSTs, 1M stripes, a small tree
    (see ``DEFAULT_OBJECTS``).

``new_bucket(s3)`` (a plain function here) makes a bucket for module-scoped fixtures.

When a test fails, the tail of every DATA_DIR/log/*.log of the filesystems it
used is attached to its report. AWS test credentials are set in ``os.environ``
for the test process and every subprocess.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helpers
import pytest
from helpers import FS, MiB

os.environ.update(helpers.AWS_ENV)

MOTO_BUFFER = str(1024 * MiB)

DEFAULT_OBJECTS = {
    "hello.txt": b"hello, lustrefuse\n",
    "dir/": b"",
    "dir/a.bin": helpers.data(3 * MiB + 17, "default-a"),
    "dir/sub/b.txt": b"b" * 1000,
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    port = helpers.free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = helpers.env()
    env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = MOTO_BUFFER
    script = Path(sys.executable).parent / "moto_server"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def answers():
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited ({proc.returncode}): {helpers.tail(log)}")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            c.request("GET", "/")
            return c.getresponse().status < 500
        finally:
            c.close()

    try:
        helpers.wait_for(answers, 30, 0.1, "moto_server to answer")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)  # moto_server (werkzeug) ignores SIGTERM
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def s3(s3_server):
    return helpers.s3_client(s3_server)


def new_bucket(s3) -> str:
    name = helpers.unique("lfs")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(s3):
    return new_bucket(s3)


class FsFactory:
    """Makes filesystems under one temporary directory and always cleans them up."""

    def __init__(self, tmp_root: Path, endpoint: str, s3):
        self.tmp_root = tmp_root
        self.endpoint = endpoint
        self.s3 = s3
        self.made: list[FS] = []

    def __call__(self, bucket, prefix="", osts=2, stripe_size="1M", extra_args=(),
                 objects=None, up=True) -> FS:
        if objects:
            p = prefix.strip("/")
            full = {(f"{p}/{k}" if p else k): v for k, v in objects.items()}
            helpers.put_objects(self.s3, bucket, full)
        root = self.tmp_root / helpers.unique("fs")
        fs = FS(root=root, bucket=bucket, prefix=prefix, endpoint=self.endpoint, s3=self.s3,
                osts=osts, stripe_size=stripe_size, extra_args=extra_args)
        self.made.append(fs)
        if up:
            fs.up()
            fs.after_up["stats"] = fs.stats()
            fs.after_up["time"] = time.time()
        return fs

    def cleanup(self) -> list[str]:
        """Stop every filesystem made here, all at once (a `down` takes seconds)."""
        if not self.made:
            return []
        with ThreadPoolExecutor(len(self.made)) as pool:
            results = list(pool.map(FS.cleanup, self.made))
        return [f"{fs.mnt}: {n}" for fs, notes in zip(self.made, results, strict=True)
                for n in notes]


@pytest.fixture
def make_fs(s3_server, s3, tmp_path):
    factory = FsFactory(tmp_path, s3_server, s3)
    yield factory
    notes = factory.cleanup()
    if notes:
        print("cleanup notes:\n" + "\n".join(notes))


@pytest.fixture(scope="module")
def make_module_fs(s3_server, s3, tmp_path_factory):
    factory = FsFactory(tmp_path_factory.mktemp("modfs"), s3_server, s3)
    yield factory
    notes = factory.cleanup()
    if notes:
        print("cleanup notes:\n" + "\n".join(notes))


@pytest.fixture
def fs(make_fs, bucket):
    return make_fs(bucket, objects=DEFAULT_OBJECTS)


def _filesystems_of(item) -> list[FS]:
    out = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, FS):
            out.append(value)
        elif isinstance(value, FsFactory):
            out.extend(value.made)
    seen, uniq = set(), []
    for f in out:
        if id(f) not in seen:
            seen.add(id(f))
            uniq.append(f)
    return uniq


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for f in _filesystems_of(item):
            try:
                rep.sections.append((f"lustrefuse logs {f.data_dir}", f.log_tails()))
            except Exception as e:  # never let log collection hide the real failure
                rep.sections.append(("lustrefuse logs", f"<cannot collect: {e}>"))
