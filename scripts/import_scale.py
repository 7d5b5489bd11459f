#!/usr/bin/env python3
"""How the MDS's import scales without an S3 endpoint in the way.

Runs the real Namespace and Importer in this process over a generated listing
(pages of 1,000 keys, as ListObjectsV2 gives them) and reports objects/s and the
peak RSS. No S3 requests are made: this measures our side of an import (key
mapping, stub creation, one transaction per page), which is what must stay
bounded in memory for a bucket of millions of objects. The endpoint's own
listing rate is measured by `lustrefuse bench`.

    .venv/bin/python scripts/import_scale.py --objects 1000000
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lustrefuse.importer import Importer  # noqa: E402
from lustrefuse.namespace import Namespace  # noqa: E402


class GeneratedListing:
    """Stands in for the bucket: a deterministic listing, sorted like S3's."""

    def __init__(self, n: int, per_dir: int):
        self.n, self.per_dir = n, per_dir
        self.when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def list_pages(self, prefix: str = "", start_after: str = ""):
        page = []
        for i in range(self.n):
            key = f"shard{i // self.per_dir:05d}/sample{i:08d}.bin"
            if key <= start_after:
                continue
            page.append({"Key": key, "Size": 4096 + i % 65536, "ETag": f'"{i:032x}"',
                         "LastModified": self.when})
            if len(page) == 1000:
                yield page
                page = []
        if page:
            yield page


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--per-dir", type=int, default=10_000, help="objects per directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ns = Namespace(os.path.join(d, "mds.db"), ost_count=4, default_stripe_size=1 << 20)
        imp = Importer(ns, GeneratedListing(args.objects, args.per_dir), "", 1 << 30, 1 << 20,
                       posix_metadata=False)
        t = time.monotonic()
        st = imp.run()
        dt = time.monotonic() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        db = os.path.getsize(os.path.join(d, "mds.db")) / 2**20
        print(f"{st.new:,} objects imported in {dt:.1f} s ({st.new / dt:,.0f} objects/s), "
              f"state {st.state}; peak RSS {rss:.0f} MiB; mds.db {db:.0f} MiB")
        return 0 if st.state == "done" and st.new == args.objects else 1


if __name__ == "__main__":
    sys.exit(main())
