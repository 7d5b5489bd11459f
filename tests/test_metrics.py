"""The opt-in Prometheus endpoints of the MDS, the OSTs and the client (issue #6)."""

import urllib.request

from helpers import MiB, data, free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def value(text: str, prefix: str) -> float:
    """The sum of every sample whose name and labels start with ``prefix``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def free_port_run(n: int) -> int:
    """A port P with P..P+n-1 all free (MDS, mount and each OST take one)."""
    import socket

    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def test_metrics_report_requests_latency_s3_bytes_and_fill(make_fs, bucket):
    port = free_port_run(4)
    body = data(3 * MiB, "metrics")
    fs = make_fs(bucket, objects={"m.bin": body}, osts=2,
                 extra_args=("--metrics-port", str(port)))
    assert open(fs.path("m.bin"), "rb").read() == body
    mds, mount = scrape(port), scrape(port + 1)
    osts = [scrape(port + 2 + i) for i in range(2)]
    assert value(mds, 'lustrefuse_rpc_requests_total{op="open",role="mds"}') >= 1
    assert 'lustrefuse_rpc_latency_seconds_bucket{le="+Inf",op="open",role="mds"}' in mds
    assert value(mds, "lustrefuse_mds_inodes") >= 2
    assert value(mount, 'lustrefuse_fuse_latency_seconds_count{op="read"}') >= 1
    assert value(mount, "lustrefuse_client_bytes_read_total") >= len(body)
    assert 0 <= value(mount, "lustrefuse_chunk_hit_ratio") <= 1
    assert sum(value(t, "lustrefuse_s3_bytes_in{") for t in osts) >= len(body)
    assert sum(value(t, "lustrefuse_ost_used_bytes{") for t in osts) >= len(body)
    assert all("lustrefuse_hydration_inflight" in t for t in osts)


def test_metrics_are_off_unless_asked(fs):
    import subprocess

    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    pids = {str(p) for p in fs.pids().values()}
    assert not any(f"pid={p}," in out for p in pids), out
