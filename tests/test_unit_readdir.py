"""The MDS's readdir pages (namespace.py): keyset pagination on (parent, id), so a page
costs its own size and a directory is never read whole, and the wire forms agree."""

import stat

import pytest

from lustrefuse.mds import Mds
from lustrefuse.namespace import ATTR_COLS, READDIR_SQL, ROOT, Namespace


@pytest.fixture
def ns(tmp_path):
    n = Namespace(str(tmp_path / "mds.db"), 2, 1 << 20)
    yield n
    n.close()


def fill(ns, parent: int, names) -> dict:
    return {name: ns.create(parent, name, stat.S_IFREG | 0o644, 0, 0)["ino"] for name in names}


def pages(ns, ino: int, limit: int) -> list[list]:
    out, after = [], 0
    while True:
        page = ns.readdir(ino, after, limit)
        if not page:
            return out
        assert len(page) <= limit
        out.append(page)
        after = page[-1][0]


def test_pages_cover_the_directory_once_in_cookie_order(ns):
    d = ns.mkdir(ROOT, b"d", stat.S_IFDIR | 0o755, 0, 0)["ino"]
    other = ns.mkdir(ROOT, b"other", stat.S_IFDIR | 0o755, 0, 0)["ino"]
    made = {}
    for i in range(250):  # interleaved with another directory's entries
        made.update(fill(ns, d, [b"f%04d" % i]))
        fill(ns, other, [b"g%04d" % i])
    got = pages(ns, d, 7)
    assert len(got) == 36  # 250 / 7, rounded up
    flat = [e for p in got for e in p]
    cookies = [e[0] for e in flat]
    assert cookies == sorted(cookies) and len(set(cookies)) == 250
    assert {e[1]: e[2]["ino"] for e in flat} == made
    assert all(e[2]["mode"] == stat.S_IFREG | 0o644 for e in flat)


def test_entries_changed_while_listing_are_neither_skipped_nor_repeated(ns):
    d = ns.mkdir(ROOT, b"d", stat.S_IFDIR | 0o755, 0, 0)["ino"]
    fill(ns, d, [b"a%03d" % i for i in range(100)])
    first = ns.readdir(d, 0, 10)
    ns.unlink(d, b"a005")  # already listed
    ns.unlink(d, b"a050")  # not listed yet: gone
    fill(ns, d, [b"late"])  # created during the listing: listed (a higher cookie)
    seen = [e[1] for e in first]
    after = first[-1][0]
    while page := ns.readdir(d, after, 10):
        seen += [e[1] for e in page]
        after = page[-1][0]
    assert len(seen) == len(set(seen)) == 100
    assert b"a050" not in seen and b"late" in seen and b"a005" in seen


def test_a_page_reads_only_its_own_rows(ns):
    plan = " | ".join(r[3] for r in ns.db.execute("EXPLAIN QUERY PLAN " + READDIR_SQL,
                                                  (ROOT, 0, 1000)))
    assert "dentries_parent_id (parent=? AND id>?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # no sort of the whole directory per page


def test_flat_rows_match_the_dict_form(tmp_path):
    mds = Mds.__new__(Mds)  # only the namespace is needed for h_readdir
    mds.ns = Namespace(str(tmp_path / "mds.db"), 2, 1 << 20)
    try:
        fill(mds.ns, ROOT, [b"x%02d" % i for i in range(30)])
        mds.ns.symlink(ROOT, b"link", b"x00", 5, 6)
        dicts = mds.h_readdir(None, ROOT, 0, 100)
        rows = mds.h_readdir(None, ROOT, 0, 100, rows=True)
        cols = [c.strip() for c in ATTR_COLS.split(",")]
        assert len(rows) == len(dicts) == 31
        for r, (cookie, name, a) in zip(rows, dicts, strict=True):
            assert (r[0], r[1]) == (cookie, name)
            assert {"dv" if c == "data_version" else c: v
                    for c, v in zip(cols, r[2:], strict=True)} == a
        assert mds.h_readdir(None, ROOT, 0, -1) == []  # never "LIMIT -1" (no limit)
        assert len(mds.h_readdir(None, ROOT, 0, 10**9, rows=True)) == 31  # capped, not refused
        assert mds.h_readdir(None, ROOT, rows[9][0], 5, rows=True) == rows[10:15]
    finally:
        mds.ns.close()
