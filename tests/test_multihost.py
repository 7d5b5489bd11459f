"""MDS, two OSTs and two clients on separate "hosts" (network namespaces), over TCP.

Seven network namespaces of this test's own: a hub holding a bridge, and one per
host -- ``s3`` (a moto server of its own: the session's moto listens on 127.0.0.1 of
the root namespace, which no other namespace can reach), ``mds``, ``ost0``, ``ost1``,
``c1``, ``c2`` -- each joined to the bridge by a veth pair, addresses in
10.231.0.0/24, no route anywhere else. Nothing is added to the root namespace's
network; everything goes away in a finalizer, even after a failure.

The MDS and the OSTs run with ``ip netns exec`` (they listen on their hosts' TCP
addresses and prove the shared secret to each other). The clients run with
``nsenter --net`` only: they live in their hosts' network namespaces but mount in
the root mount namespace (``ip netns exec`` would give each a private one), so the
test reads their mounts directly, in subprocesses with timeouts.

Checked: both clients read the imported objects byte for byte, and the bytes come
from the remote OSTs over TCP (the OSTs' ``read`` RPC; no descriptor is handed
across hosts); a file written and closed on one client reads the same on the
other, both ways, including a rewrite of a file the other had cached
(close-to-open); a restore asked on one client is seen by the other; a client
with a wrong secret, or none, cannot mount and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import helpers
import pytest
from helpers import MiB, wait_for

pytestmark = pytest.mark.timeout(180)

SUBNET = "10.231.0"
HOSTS = {"s3": 2, "mds": 10, "ost0": 20, "ost1": 21, "c1": 31, "c2": 32}
S3_PORT, MDS_PORT, OST_PORT = 5000, 7000, 7001
MDS_ADDR = f"tcp:{SUBNET}.{HOSTS['mds']}:{MDS_PORT}"
ENDPOINT = f"http://{SUBNET}.{HOSTS['s3']}:{S3_PORT}"
BUCKET = "multihost"

# key -> (size, seed); the bytes are helpers.data(size, seed) = Random(str(seed)).randbytes(size)
OBJECTS = {"data/big.bin": (5 * MiB + 123, "big"),
           "data/small.txt": (17, "small"),
           "data/sub/c.bin": (300_001, "c"),
           "data/restore.bin": (3 * MiB + 5, "restore")}

PUT = r"""
import json, random, sys, time
import boto3, botocore.config
endpoint, bucket, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing",
                  config=botocore.config.Config(s3={"addressing_style": "path"},
                                                connect_timeout=2, read_timeout=30))
deadline = time.monotonic() + 30
while True:
    try:
        s3.create_bucket(Bucket=bucket)
        break
    except Exception as e:
        if time.monotonic() > deadline:
            raise SystemExit(f"moto did not answer at {endpoint}: {e}")
        time.sleep(0.2)
for key, (n, seed) in spec.items():
    s3.put_object(Bucket=bucket, Key=key, Body=random.Random(str(seed)).randbytes(n))
print("ok")
"""

CALL = r"""
import json, sys
from lustrefuse import rpc
addr, secret_file, op, args = sys.argv[1:5]
with open(secret_file, "rb") as f:
    secret = f.read().strip()
c = rpc.Client(addr, secret, timeout=10)
print(json.dumps(c.call(op, **json.loads(args)), default=str))
"""

DIGEST = r"""
import errno, hashlib, json, os, sys
out = {}
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as f:
            b = f.read()
        out[p] = {"size": len(b), "sha": hashlib.sha256(b).hexdigest()}
    except OSError as e:
        out[p] = {"error": errno.errorcode.get(e.errno, str(e.errno))}
print(json.dumps(out))
"""


def sh(*cmd, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=helpers.env())
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: rc {r.returncode}: {r.stderr.strip()}")
    return r


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def digests(*paths, timeout: float = 60) -> dict:
    r = helpers.run([sys.executable, "-c", DIGEST, *paths], timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Net:
    """The namespaces, the bridge and the veths; ``close`` removes them all."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"lfmh-{self.tag}-hub"
        self.ns = {h: f"lfmh-{self.tag}-{h}" for h in HOSTS}
        self.made: list[str] = []

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}"

    def build(self):
        sh("ip", "netns", "add", self.hub)
        self.made.append(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, (host, ns) in enumerate(self.ns.items()):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            here, there = f"v{self.tag}h{i}", f"v{self.tag}b{i}"
            sh("ip", "link", "add", here, "netns", ns, "type", "veth", "peer", "name", there,
               "netns", self.hub)
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", here)
            sh("ip", "-n", ns, "link", "set", here, "up")
            sh("ip", "-n", self.hub, "link", "set", there, "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", there, "up")

    def exec(self, host: str) -> list[str]:
        """Run in the host's network namespace (and a private mount namespace)."""
        return ["ip", "netns", "exec", self.ns[host]]

    def net_only(self, host: str) -> list[str]:
        """Run in the host's network namespace, in the root mount namespace."""
        return ["nsenter", f"--net=/run/netns/{self.ns[host]}", "--"]

    def close(self) -> list[str]:
        notes = []
        for ns in reversed(self.made):
            r = sh("ip", "netns", "pids", ns, check=False)
            pids = [int(p) for p in r.stdout.split() if p.strip().isdigit()]
            if pids:
                notes.append(f"killed {pids} left in {ns}")
                helpers.kill_pids(pids)
        for ns in reversed(self.made):
            for _ in range(50):
                if sh("ip", "netns", "del", ns, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                notes.append(f"could not delete {ns}")
        left = [n for n in sh("ip", "netns", "list", check=False).stdout.split()
                if n.startswith(f"lfmh-{self.tag}")]
        if left:
            notes.append(f"namespaces left: {left}")
        return notes


class Cluster:
    def __init__(self, net: Net, root: Path):
        self.net = net
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = root / "log"
        self.logs.mkdir(parents=True)
        self.secret = root / "secret"
        self.secret.write_text(secrets.token_hex(24) + "\n")
        self.secret.chmod(0o600)
        self.data_dir = root / "mds"
        self.mnt = {c: root / f"mnt-{c}" for c in ("c1", "c2")}

    def spawn(self, name: str, cmd: list, env: dict | None = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.out", "ab") as out:
            p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env or helpers.env())
        self.procs[name] = p
        return p

    def call(self, host: str, op: str, **args):
        r = sh(*self.net.exec(host), sys.executable, "-c", CALL, MDS_ADDR, self.secret, op,
               json.dumps(args))
        return json.loads(r.stdout)

    def alive(self, name: str):
        p = self.procs[name]
        if p.poll() is not None:
            raise AssertionError(f"{name} exited ({p.returncode}):\n{self.log_tail(name)}")
        return True

    def log_tail(self, name: str) -> str:
        return helpers.tail(self.logs / f"{name}.out", 30)

    def all_logs(self) -> str:
        return "\n".join(f"----- {n} -----\n{self.log_tail(n)}" for n in self.procs)

    def start(self):
        net, lf = self.net, helpers.LUSTREFUSE
        # S3, on its own host
        env = helpers.env()
        env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(256 * MiB)
        moto = Path(sys.executable).parent / "moto_server"
        self.spawn("moto", [*net.exec("s3"), moto, "-H", net.ip("s3"), "-p", S3_PORT], env)
        sh(*net.exec("s3"), sys.executable, "-c", PUT, ENDPOINT, BUCKET, json.dumps(OBJECTS),
           timeout=90)
        # the filesystem's config, as `up` would write it
        self.data_dir.mkdir()
        (self.data_dir / "fs.json").write_text(json.dumps({
            "bucket": BUCKET, "prefix": "", "endpoint_url": ENDPOINT, "osts": 2,
            "stripe_size": MiB, "imported_file_chunk_size": MiB, "fsname": "multihost"}))
        self.spawn("mds", [*net.exec("mds"), lf, "mds", "--data-dir", self.data_dir, "--listen",
                           MDS_ADDR, "--secret-file", self.secret])
        wait_for(lambda: self.alive("mds") and self.call("mds", "ping"), 30, 0.2,
                 "the MDS to answer over TCP")
        for i in (0, 1):
            host = f"ost{i}"
            self.spawn(host, [*net.exec(host), lf, "ost", "--index", i, "--dir",
                              self.root / host, "--mds", MDS_ADDR, "--listen",
                              f"tcp:{net.ip(host)}:{OST_PORT}", "--secret-file", self.secret])
        wait_for(lambda: self.alive("ost0") and self.alive("ost1")
                 and len(self.call("mds", "config")["osts"]) == 2, 30, 0.2,
                 "both OSTs to register")
        # import (no CLI for it across hosts: the MDS's RPC, from the MDS's host)
        self.call("mds", "import_start")
        st = wait_for(lambda: (s := self.call("mds", "import_status"))["state"] != "running" and s,
                      60, 0.2, "the import")
        assert st["state"] == "done", st
        for c, mnt in self.mnt.items():
            mnt.mkdir()
            self.spawn(c, [*net.net_only(c), lf, "mount", MDS_ADDR, mnt, "--secret-file",
                           self.secret])
        for c, mnt in self.mnt.items():
            wait_for(lambda c=c, mnt=mnt: self.alive(c) and helpers.is_mounted(mnt), 30, 0.1,
                     f"{c} to mount")

    def stop(self) -> list[str]:
        notes = []
        for mnt in self.root.glob("mnt-*"):
            if helpers.is_mounted(mnt):
                r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
                if r.returncode != 0:
                    notes.append(f"lazy unmount of {mnt}")
                    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                                   timeout=30)
        order = [n for n in self.procs if n.startswith("c")] + ["ost0", "ost1", "mds", "moto"]
        for name in order + [n for n in self.procs if n not in order]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                notes.append(f"killed {name}")
                p.kill()
                p.wait(10)
        return notes


@pytest.fixture(scope="module")
def net():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    probe = f"lfmh-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"'ip netns add' is not permitted here: {r.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    n = Net()
    try:
        n.build()
        yield n
    finally:
        notes = n.close()
        if notes:
            print("network cleanup notes:", notes)


@pytest.fixture(scope="module")
def cluster(net, tmp_path_factory):
    c = Cluster(net, tmp_path_factory.mktemp("multihost"))
    try:
        try:
            c.start()
        except Exception as e:
            raise AssertionError(f"cluster did not start: {e}\n{c.all_logs()}") from None
        yield c
    finally:
        notes = c.stop()
        if notes:
            print("cluster cleanup notes:", notes)


def expected(key: str) -> bytes:
    n, seed = OBJECTS[key]
    return helpers.data(n, seed)


def stats(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt / helpers.CTL, "lustrefuse.stats"))


def test_the_cluster_really_is_spread_over_hosts(cluster):
    cfg = cluster.call("c1", "config")  # a client host reaches the MDS
    assert cfg["osts"] == {"0": f"tcp:{cluster.net.ip('ost0')}:{OST_PORT}",
                           "1": f"tcp:{cluster.net.ip('ost1')}:{OST_PORT}"}
    # each host has only its own address, on the test's bridge, and no route elsewhere
    for host, ns in cluster.net.ns.items():
        addrs = sh("ip", "-n", ns, "-o", "-4", "addr", "show").stdout
        assert f"{cluster.net.ip(host)}/24" in addrs and addrs.count("inet ") == 2, addrs
        routes = sh("ip", "-n", ns, "route").stdout.strip().splitlines()
        assert len(routes) == 1 and routes[0].startswith(f"{SUBNET}.0/24 dev v{cluster.net.tag}h"), routes


def test_both_clients_read_imported_objects_byte_exact(cluster):
    keys = [k for k in OBJECTS if k != "data/restore.bin"]  # left released for the restore test
    paths = {c: {k: str(m / k) for k in keys} for c, m in cluster.mnt.items()}
    before = {c: stats(m) for c, m in cluster.mnt.items()}
    for c in ("c1", "c2"):
        got = digests(*paths[c].values())
        for key, p in paths[c].items():
            want = expected(key)
            assert got[p] == {"size": len(want), "sha": sha(want)}, (c, key, got[p])
    for c, m in cluster.mnt.items():
        after = stats(m)
        # the bytes came over TCP from the OSTs' read RPC: no descriptor crossed hosts
        served = sum(after["osts"][i]["bytes_served"] - before[c]["osts"][i]["bytes_served"]
                     for i in ("0", "1"))
        assert served >= sum(OBJECTS[k][0] for k in keys), (c, after["osts"])
        assert all(after["osts"][i]["fds_handed"] == 0 for i in ("0", "1")), after["osts"]
        assert after["client"].get("bytes_from_ost", 0) > before[c]["client"].get("bytes_from_ost", 0)
    # big.bin is striped over both OSTs (1 MiB imported chunks, two OSTs)
    info = json.loads(os.getxattr(paths["c1"]["data/big.bin"], "lustrefuse.info"))
    assert sorted(info["layout"]["osts"]) == [0, 1] and info["hsm"]["flags"] == 0x9, info


def test_written_on_one_client_read_on_the_other(cluster):
    m1, m2 = cluster.mnt["c1"], cluster.mnt["c2"]
    one = helpers.data(2 * MiB + 999, "from-c1")
    (m1 / "shared").mkdir()
    with open(m1 / "shared/one.bin", "wb") as f:
        f.write(one)
    assert digests(str(m2 / "shared/one.bin"))[str(m2 / "shared/one.bin")] == {
        "size": len(one), "sha": sha(one)}
    two = helpers.data(700_000, "from-c2")
    with open(m2 / "shared/two.bin", "wb") as f:
        f.write(two)
    assert digests(str(m1 / "shared/two.bin"))[str(m1 / "shared/two.bin")] == {
        "size": len(two), "sha": sha(two)}


def test_rewrite_seen_after_reopen_on_the_other_client(cluster):
    """close-to-open: c2 has read (and cached) v1; c1 rewrites the file longer; c2's next
    open reads v2 whole, not its cached pages nor its cached size."""
    m1, m2 = cluster.mnt["c1"], cluster.mnt["c2"]
    v1, v2 = helpers.data(100_000, "v1"), helpers.data(1_500_000, "v2")
    with open(m1 / "ckpt.bin", "wb") as f:
        f.write(v1)
    with open(m2 / "ckpt.bin", "rb") as f:  # in this process: its pages stay cached
        assert f.read() == v1
    with open(m1 / "ckpt.bin", "wb") as f:
        f.write(v2)
    p = str(m2 / "ckpt.bin")
    assert digests(p)[p] == {"size": len(v2), "sha": sha(v2)}
    # and back the other way: c2 appends, c1 sees the whole file
    tail = b"appended by c2\n"
    with open(m2 / "ckpt.bin", "ab") as f:
        f.write(tail)
    p = str(m1 / "ckpt.bin")
    assert digests(p)[p] == {"size": len(v2) + len(tail), "sha": sha(v2 + tail)}


def test_restore_asked_on_one_client_seen_on_the_other(cluster):
    key = "data/restore.bin"
    m1, m2 = cluster.mnt["c1"], cluster.mnt["c2"]
    flags = json.loads(os.getxattr(m2 / key, "lustrefuse.info"))["hsm"]["flags"]
    assert flags == 0xD  # still a released stub
    r = helpers.lfs("hsm_restore", m1 / key)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: json.loads(os.getxattr(m2 / key, "lustrefuse.info"))["hsm"]["flags"] == 0x9,
             60, 0.2, "the restore (by the MDS and the OSTs, over TCP) to complete")
    p = str(m2 / key)
    want = expected(key)
    assert digests(p)[p] == {"size": len(want), "sha": sha(want)}
    # statfs: the MDS asks both OSTs over TCP
    st = os.statvfs(m1)
    assert st.f_blocks > 0


_REFUSED: dict[str, dict] = {}


def refused_client(cluster, how: str) -> dict:
    """Mount on c2 with a wrong secret file, or none; what happened (run once per kind)."""
    if how in _REFUSED:
        return _REFUSED[how]
    net, root = cluster.net, cluster.root / f"refused-{how}"
    root.mkdir()
    mnt = root / "mnt"
    mnt.mkdir()
    args = []
    if how == "wrong":
        bad = root / "wrong-secret"
        bad.write_text(secrets.token_hex(24) + "\n")
        args = ["--secret-file", bad]
    name = f"c2-{how}"
    p = cluster.spawn(name, [*net.net_only("c2"), helpers.LUSTREFUSE, "mount", MDS_ADDR, mnt, *args])
    res = {"mounted_meanwhile": False, "ls": None}
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:  # still running: then it must not serve anything
        res["mounted_meanwhile"] = helpers.is_mounted(mnt)
        if res["mounted_meanwhile"]:
            r = helpers.run(["ls", mnt], timeout=30)
            res["ls"] = (r.returncode, r.stdout, r.stderr)
        p.terminate()
        p.wait(10)
    finally:
        if helpers.is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
    res.update(rc=p.returncode, out=cluster.log_tail(name), mounted=helpers.is_mounted(mnt))
    _REFUSED[how] = res
    return res


@pytest.mark.parametrize("how", ["wrong", "none"])
def test_client_without_the_secret_cannot_mount(cluster, how):
    res = refused_client(cluster, how)
    assert not res["mounted_meanwhile"] and res["rc"] not in (0, None), res
    assert not res["mounted"]
    mds_log = cluster.log_tail("mds")
    assert "refused a TCP client without the shared secret" in mds_log, mds_log
    # the cluster goes on serving the real clients
    p = str(cluster.mnt["c1"] / "data/small.txt")
    assert digests(p)[p]["sha"] == sha(expected("data/small.txt"))


@pytest.mark.parametrize("how", ["wrong", "none"])
def test_refused_client_says_the_secret_is_wrong(cluster, how):
    res = refused_client(cluster, how)
    low = res["out"].lower()
    assert "secret" in low or "authenticat" in low, (
        f"the refused client does not say why (a wrong or missing shared secret):\n{res['out']}")


def test_nothing_leaks_into_the_root_namespace(cluster):
    links = sh("ip", "-o", "link", "show").stdout
    assert cluster.net.tag not in links
    with contextlib.suppress(FileNotFoundError):
        assert "10.231.0." not in sh("ip", "-o", "addr", "show").stdout
