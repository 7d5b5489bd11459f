"""lustrefuse.s3.Repository against moto through the fault-injecting proxy (no mount).

Each S3 error is injected at the HTTP level, so these tests see what boto3 and
our retry loop make of real broken answers: 5xx codes, connections reset
mid-body, bodies cut short, a changed ETag, an endpoint that refuses
connections.
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest
from s3fault import FaultProxy

from lustrefuse import s3 as s3mod
from lustrefuse.s3 import NoSuchObject, Repository, S3Error, StaleObject

KEY = "data/obj.bin"
SIZE = 300_000
# Our own backoff sleeps sum to ~1.6 s (at most ~2.4 s) over RETRIES tries.
GIVE_UP_WITHIN = 15.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


@pytest.fixture
def obj(s3, bucket):
    data = os.urandom(SIZE)
    etag = s3.put_object(Bucket=bucket, Key=KEY, Body=data)["ETag"]
    return data, etag


@pytest.fixture
def repo(proxy, bucket):
    r = Repository(bucket, proxy.url)
    yield r
    r.client.close()


def test_clean_ranged_get_passes_through(repo, proxy, obj):
    data, etag = obj
    assert repo.get_range(KEY, 1000, 5000, etag) == data[1000:6000]
    assert repo.get_range(KEY, 0, 0, etag) == b""
    (req,) = proxy.requests(method="GET", key=KEY)
    assert req.range == "bytes=1000-5999"
    assert req.headers.get("if-match") == etag
    assert repo.counters.retries == 0
    assert repo.counters.gets == 1 and repo.counters.bytes_in == 5000


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError")])
def test_transient_status_retried_then_success(repo, proxy, obj, status, code):
    data, etag = obj
    rule = proxy.add("status", method="GET", key=KEY, ranged=True, times=3, status=status, code=code)
    assert repo.get_range(KEY, 0, SIZE, etag) == data
    assert rule.fired == 3
    # one HTTP request per try: our loop owns the retries (botocore must not retry on its own)
    assert proxy.count(method="GET", key=KEY) == 4
    assert repo.counters.retries == 3


@pytest.mark.parametrize("kind", ["reset", "truncate", "short", "drop"])
def test_broken_body_retried(repo, proxy, obj, kind):
    data, etag = obj
    proxy.add(kind, method="GET", key=KEY, times=2, fraction=0.4)
    assert repo.get_range(KEY, 10, SIZE - 10, etag) == data[10:]
    assert proxy.count(method="GET", key=KEY, fault=kind) == 2
    assert proxy.count(method="GET", key=KEY) == 3
    assert repo.counters.retries == 2
    assert repo.counters.gets == 1 and repo.counters.bytes_in == SIZE - 10


def test_short_body_is_retried_not_returned(repo, proxy, obj, monkeypatch):
    """A well-formed 206 with fewer bytes than asked for is _ShortBody, never returned."""
    data, etag = obj
    seen = []
    real = s3mod._ShortBody

    class Spy(real):
        def __init__(self, *a):
            seen.append(a)
            super().__init__(*a)

    monkeypatch.setattr(s3mod, "_ShortBody", Spy)
    proxy.add("short", method="GET", key=KEY, times=1, fraction=0.5)
    assert repo.get_range(KEY, 0, 1000, etag) == data[:1000]
    assert len(seen) == 1 and "got 500 of 1000" in str(seen[0])


def test_latency_is_not_an_error(repo, proxy, obj):
    data, etag = obj
    proxy.add("latency", method="GET", key=KEY, times=1, delay=0.3)
    t = time.monotonic()
    assert repo.get_range(KEY, 0, 100, etag) == data[:100]
    assert time.monotonic() - t >= 0.3
    assert repo.counters.retries == 0


def test_412_is_stale_and_not_retried(repo, proxy, obj):
    data, etag = obj
    with pytest.raises(StaleObject):
        repo.get_range(KEY, 0, 100, '"0123456789abcdef0123456789abcdef"')
    assert proxy.count(method="GET", key=KEY) == 1
    # an injected 412 as well
    proxy.add("status", method="GET", key=KEY, status=412, code="PreconditionFailed")
    with pytest.raises(StaleObject):
        repo.get_range(KEY, 0, 100, etag)
    assert proxy.count(method="GET", key=KEY) == 2
    assert repo.counters.retries == 0


def test_changed_etag_header_is_stale(repo, proxy, obj):
    data, etag = obj
    proxy.add("etag", method="GET", key=KEY)
    with pytest.raises(StaleObject):
        repo.get_range(KEY, 0, 100, etag)
    assert proxy.count(method="GET", key=KEY) == 1
    assert repo.counters.gets == 0 and repo.counters.bytes_in == 0


def test_object_changed_in_s3_is_stale(repo, s3, bucket, obj):
    data, etag = obj
    s3.put_object(Bucket=bucket, Key=KEY, Body=b"another version")
    with pytest.raises(StaleObject):
        repo.get_range(KEY, 0, 10, etag)


def test_gives_up_after_retries(repo, proxy, obj):
    data, etag = obj
    proxy.add("status", method="GET", key=KEY, status=500, code="InternalError")
    t = time.monotonic()
    with pytest.raises(S3Error) as ei:
        repo.get_range(KEY, 0, 100, etag)
    elapsed = time.monotonic() - t
    assert type(ei.value) is S3Error
    assert ei.value.code == "S3Error"
    assert f"giving up after {s3mod.RETRIES} tries" in str(ei.value)
    assert KEY in str(ei.value) and "InternalError" in str(ei.value)
    assert elapsed < GIVE_UP_WITHIN
    assert proxy.count(method="GET", key=KEY) == s3mod.RETRIES
    assert repo.counters.retries == s3mod.RETRIES


def test_gives_up_on_broken_bodies(repo, proxy, obj):
    data, etag = obj
    proxy.add("reset", method="GET", key=KEY, fraction=0.3)
    with pytest.raises(S3Error, match="giving up"):
        repo.get_range(KEY, 0, SIZE, etag)
    assert proxy.count(method="GET", key=KEY) == s3mod.RETRIES


def test_endpoint_down_then_up(repo, proxy, obj):
    data, etag = obj
    assert repo.get_range(KEY, 0, 10, etag) == data[:10]  # a pooled connection exists
    proxy.down()
    t = time.monotonic()
    with pytest.raises(S3Error, match="giving up"):
        repo.get_range(KEY, 0, 10, etag)
    assert time.monotonic() - t < GIVE_UP_WITHIN
    proxy.up()
    assert repo.get_range(KEY, 5, 10, etag) == data[5:15]


def test_non_transient_errors_are_not_retried(repo, proxy, obj):
    data, etag = obj
    with pytest.raises(NoSuchObject):
        repo.get_range("data/missing.bin", 0, 10, None)
    assert proxy.count(method="GET", key="data/missing.bin") == 1
    proxy.add("status", method="GET", key=KEY, status=403, code="AccessDenied")
    with pytest.raises(S3Error) as ei:
        repo.get_range(KEY, 0, 10, etag)
    assert ei.value.code == "S3AccessDenied"
    assert proxy.count(method="GET", key=KEY) == 1
    assert repo.counters.retries == 0


def test_transient_head_and_list_retried(repo, proxy, obj):
    data, etag = obj
    proxy.add("status", method="HEAD", key=KEY, times=2, status=503)
    assert repo.head(KEY)["ContentLength"] == SIZE
    proxy.add("reset", method="GET", key="", times=1)  # the listing, cut mid-body
    pages = list(repo.list_pages(""))
    assert [o["Key"] for o in pages[0]] == [KEY]
    assert proxy.count(method="HEAD", key=KEY) == 3


def test_random_faults_under_concurrency(repo, proxy, obj):
    """Many parallel ranged GETs with seeded random faults: every byte comes back right."""
    data, etag = obj
    # one sure fault, then about one request in seven broken at random (a range would
    # need RETRIES broken answers in a row to fail: ~2e-4 over the whole test)
    proxy.add("truncate", method="GET", key=KEY, ranged=True, times=1, fraction=0.3)
    for i, kind in enumerate(("reset", "truncate", "short", "status", "drop")):
        proxy.add(kind, method="GET", key=KEY, ranged=True, probability=0.03, seed=i, fraction=0.3)
    proxy.add("latency", method="GET", key=KEY, probability=0.2, seed=99, delay=0.02)
    step = 10_000

    def one(off):
        return off, repo.get_range(KEY, off, min(step, SIZE - off), etag)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(one, range(0, SIZE, step)))
    assert b"".join(got[o] for o in sorted(got)) == data
    faults = sum(r.fired for r in proxy.rules if r.kind != "latency")
    assert faults > 0
    assert repo.counters.retries >= 1
