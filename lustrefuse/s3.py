"""The S3 data repository behind one small interface (boto3 underneath).

Every ranged GET is pinned to the ETag recorded at import (``IfMatch``) so a
file is never assembled from two versions of an object. Transient errors are
retried with exponential backoff and jitter; a short or broken body is a
transient error too.
"""

from __future__ import annotations

import http.client
import logging
import random
import threading
import time
from dataclasses import dataclass

import boto3
import botocore.config
import botocore.exceptions

log = logging.getLogger(__name__)

RETRIES = 6
_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "InternalError",
                    "RequestTimeout", "ServiceUnavailable", "RequestTimeTooSkewed"}


class S3Error(Exception):
    """A failure after retries; ``code`` is S3's error code or a short reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class StaleObject(S3Error):
    """The object changed since import (ETag mismatch)."""


class NoSuchObject(S3Error):
    pass


@dataclass
class Counters:
    requests: int = 0
    gets: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    retries: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Repository:
    """One bucket (and prefix) reached through one endpoint."""

    def __init__(self, bucket: str, endpoint_url: str | None = None,
                 max_connections: int = 64, region: str | None = None):
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        cfg = botocore.config.Config(
            max_pool_connections=max_connections,
            connect_timeout=5,
            read_timeout=30,
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry (and count) ourselves
            s3={"addressing_style": "path"},
        )
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url, config=cfg,
                                     region_name=region or session.region_name or "us-east-1")
        self.counters = Counters()
        self._lock = threading.Lock()

    def _count(self, **kw):
        with self._lock:
            for k, v in kw.items():
                setattr(self.counters, k, getattr(self.counters, k) + v)

    def _retry(self, what: str, fn):
        delay = 0.05
        for attempt in range(RETRIES):
            self._count(requests=1)
            try:
                return fn()
            except botocore.exceptions.ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if code in ("PreconditionFailed", "412") or status == "412":
                    self._count(errors=1)
                    raise StaleObject("PreconditionFailed", f"{what}: object changed since import") from None
                if code in ("NoSuchKey", "404", "NotFound"):
                    self._count(errors=1)
                    raise NoSuchObject("S3ObjectNotFound", f"{what}: no such object") from None
                if code in ("NoSuchBucket",):
                    self._count(errors=1)
                    raise S3Error(code, "bucket does not exist") from None
                if code in ("AccessDenied", "403"):
                    self._count(errors=1)
                    raise S3Error("S3AccessDenied", f"{what}: access denied") from None
                if code not in _TRANSIENT_CODES and status not in _TRANSIENT_CODES:
                    self._count(errors=1)
                    raise S3Error(code or status, f"{what}: {e}") from None
                err = f"{code or status}"
            except (botocore.exceptions.NoCredentialsError,
                    botocore.exceptions.PartialCredentialsError) as e:
                self._count(errors=1)
                raise S3Error("S3AccessDenied", f"{what}: {e}") from None
            except (botocore.exceptions.BotoCoreError, ConnectionError, OSError,
                    _ShortBody) as e:
                err = f"{type(e).__name__}: {e}"
            self._count(errors=1, retries=1)
            if attempt == RETRIES - 1:
                raise S3Error("S3Error", f"{what}: giving up after {RETRIES} tries: {err}")
            log.info("%s: %s, retrying in %.2fs", what, err, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    # -- namespace ---------------------------------------------------------

    def check_bucket(self):
        try:
            self._retry("head bucket", lambda: self.client.head_bucket(Bucket=self.bucket))
        except NoSuchObject:  # HEAD has no body: a bare 404 is the bucket's
            raise S3Error("NoSuchBucket", "bucket does not exist") from None

    def list_pages(self, prefix: str = "", start_after: str = ""):
        """Yield lists of ``{"Key", "Size", "ETag", "LastModified"}``, 1,000 at a time."""
        token = None
        while True:
            args = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                args["ContinuationToken"] = token
            elif start_after:
                args["StartAfter"] = start_after
            page = self._retry(f"list s3://{self.bucket}/{prefix}",
                               lambda a=args: self.client.list_objects_v2(**a))
            yield page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def head(self, key: str) -> dict:
        return self._retry(f"head {key}",
                           lambda: self.client.head_object(Bucket=self.bucket, Key=key))

    # -- data --------------------------------------------------------------

    def get_range(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        """Bytes [start, start+length) of the object, exactly, pinned to ``etag``."""
        buf = bytearray(length)
        self.get_range_into(key, start, memoryview(buf), etag)
        return bytes(buf)

    def get_range_into(self, key: str, start: int, view: memoryview, etag: str | None):
        """Bytes [start, start+len(view)) of the object, exactly, into ``view`` (straight
        from the socket: no intermediate copy), pinned to ``etag``."""

        def once():
            args = {"Bucket": self.bucket, "Key": key,
                    "Range": f"bytes={start}-{start + len(view) - 1}"}
            if etag:
                args["IfMatch"] = etag
            resp = self.client.get_object(**args)
            got = resp.get("ETag")
            if etag and got and got != etag:
                raise StaleObject("PreconditionFailed", f"{key}: ETag {got} != {etag}")
            read_body_into(resp["Body"], view, key)

        if len(view):
            self._retry(f"get {key} [{start}+{len(view)}]", once)
            self._count(gets=1, bytes_in=len(view))

    def get_object(self, key: str) -> bytes:
        """A whole (small) object, e.g. a symlink's target; the body is read inside the retry."""
        def once():
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        data = self._retry(f"get {key}", once)
        self._count(gets=1, bytes_in=len(data))
        return data

    def put_object(self, key: str, body: bytes, metadata: dict | None = None) -> str:
        resp = self._retry(f"put {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, Metadata=metadata or {}))
        self._count(bytes_out=len(body))
        return resp["ETag"]

    def copy_object(self, src: str, dst: str, metadata: dict | None = None) -> str:
        """Server-side copy (also used to rewrite an object's metadata in place)."""
        resp = self._retry(f"copy {src} -> {dst}", lambda: self.client.copy_object(
            Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src},
            Metadata=metadata or {}, MetadataDirective="REPLACE"))
        return resp["CopyObjectResult"]["ETag"]

    def delete_object(self, key: str):
        self._retry(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def upload_parts(self, key: str, parts, metadata: dict | None = None) -> str:
        """Multipart upload from an iterator of byte strings (each >= 5 MiB but the last).

        Memory is bounded by one part. Aborts the upload on any failure.
        """
        first = next(parts, b"")
        second = next(parts, None)
        if second is None:
            return self.put_object(key, first, metadata)
        mpu = self._retry(f"create upload {key}", lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, Metadata=metadata or {}))
        uid = mpu["UploadId"]
        done = []
        try:
            def send(n, data):
                r = self._retry(f"upload part {n} of {key}", lambda: self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=uid, PartNumber=n, Body=data))
                self._count(bytes_out=len(data))
                done.append({"PartNumber": n, "ETag": r["ETag"]})

            send(1, first)
            send(2, second)
            for n, data in enumerate(parts, start=3):
                send(n, data)
            resp = self._retry(f"complete upload {key}", lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": done}))
            return resp["ETag"]
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=uid)
            except Exception:
                log.warning("could not abort the upload of %s", key)
            raise


class _ShortBody(Exception):
    """The body ended early or the connection broke mid-body (transient)."""


def read_body_into(body, view: memoryview, key: str):
    """Fill ``view`` from a GET's streaming body and hand the connection back.

    The bytes are read with ``readinto`` of the HTTP response beneath urllib3 when the
    body is not content-encoded: urllib3's own ``readinto`` reads into a new buffer and
    copies. Anything but exactly ``len(view)`` bytes is a short body (retried)."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    plain = (fp is not None and hasattr(fp, "readinto") and hasattr(raw, "release_conn")
             and raw.headers.get("content-encoding", "identity") == "identity")
    readinto = fp.readinto if plain else body.readinto
    pos = 0
    try:
        while pos < len(view):
            n = readinto(view[pos:])
            if not n:
                raise _ShortBody(f"{key}: got {pos} of {len(view)} bytes")
            pos += n
        if plain and not fp.isclosed():  # more bytes than asked for: not a clean answer
            raise _ShortBody(f"{key}: body longer than {len(view)} bytes")
    except http.client.HTTPException as e:  # beneath urllib3: no translation of its errors
        if raw is not None:
            raw.close()
        raise _ShortBody(f"{key}: {type(e).__name__}: {e}") from None
    except BaseException:
        if raw is not None:
            raw.close()  # a connection with unread bytes on it is never reused
        raise
    if plain:
        raw.release_conn()  # read to its end: the connection goes back to the pool
