"""lfs argument parsing, validation and error reporting, without a mount.

A fake mount is a temporary directory holding the control file, listed as a
lustrefuse mount, with getxattr/setxattr replaced by a dictionary and a log.
"""

import errno
import json
import os

import pytest

from lustrefuse import hsm, layout, lfs

MiB = 1 << 20
DEFAULTS = {"stripe_size": MiB, "stripe_count": 1, "stripe_offset": -1}


def run(capsys, *argv):
    rc = lfs.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- not a lustrefuse mount, usage errors -------------------------------------

def test_hsm_state_outside_a_mount_is_a_clear_error(capsys):
    rc, out, err = run(capsys, "hsm_state", "/tmp")
    assert rc != 0 and out == ""
    assert err == ("lfs hsm_state: '/tmp' is not on a Lustre filesystem: "
                   "Inappropriate ioctl for device\n")


def test_hsm_state_spelled_the_2_17_way(capsys):
    rc, _, err = run(capsys, "hsm", "state", "/tmp")
    assert rc == 1 and err.startswith("lfs hsm_state: '/tmp' is not on a Lustre filesystem")


def test_missing_file_reports_errno_and_goes_on(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    rc, _, err = run(capsys, "hsm_action", missing, "/tmp")
    assert rc == 1
    assert err.splitlines() == [
        f"lfs hsm_action: get HSM action for '{missing}' failed: No such file or directory",
        "lfs hsm_action: '/tmp' is not on a Lustre filesystem: Inappropriate ioctl for device"]


@pytest.mark.parametrize("argv", [
    ["getstripe", "--bogus", "f"],
    ["hsm_state", "-x", "f"],
    ["hsm_state"],
    ["df", "--no-such-option"],
    ["setstripe", "-c"],
])
def test_unknown_or_incomplete_options_exit_2(capsys, argv):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert "usage: lfs " in err and "error:" in err


def test_unknown_command_exits_2(capsys):
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2 and "unknown command 'frobnicate'" in err


def test_no_command_prints_usage(capsys):
    rc, _, err = run(capsys)
    assert rc == 2 and "usage: lfs COMMAND" in err


def test_help_for_each_command(capsys):
    for name in [*lfs.COMMANDS, "find"]:
        rc, out, _ = run(capsys, name, "--help")
        assert rc == 0 and out.startswith(("usage: lfs ", "lfs find")), name
        rc, out2, _ = run(capsys, "help", name)
        assert rc == 0 and out2 == out, name
    rc, out, _ = run(capsys, "help")
    assert rc == 0 and "hsm_restore" in out and "getstripe" in out


def test_hsm_set_needs_a_flag(capsys):
    rc, _, err = run(capsys, "hsm_set", "f")
    assert rc == 2 and "flag" in err


def test_archive_id_only_for_archive_and_remove(capsys):
    rc, _, err = run(capsys, "hsm_restore", "-a", "1", "f")
    assert rc == 2 and "-a is supported only when archiving or removing" in err


@pytest.mark.parametrize("argv, message", [
    (["-S", "100000"], "invalid stripe size '100000'"),
    (["-S", "1x"], "invalid stripe size '1x'"),
    (["-S", "5G"], "invalid stripe size '5G'"),
    (["-c", "2001"], "invalid stripe count '2001'"),
    (["-c", "-2"], "invalid stripe count '-2'"),
    (["-c", "two"], "invalid stripe count 'two'"),
    (["-i", "-2"], "invalid stripe offset '-2'"),
    (["-o", "1,x"], "invalid OST target(s) '1,x'"),
    (["-o", "4-2"], "invalid OST target(s) '4-2'"),
    (["-o", "1,2", "-c", "3"], "doesn't match the number of OSTs"),
    (["-d", "-c", "2"], "mutually exclusive"),
    (["-E", "1G"], "not supported"),
    (["-p", "flash"], "not supported"),
    (["-L", "mdt"], "not supported"),
])
def test_setstripe_rejects_bad_values(capsys, argv, message):
    rc, _, err = run(capsys, "setstripe", *argv, "/tmp/never-created")
    assert rc == 2 and message in err
    assert not os.path.exists("/tmp/never-created")


def test_stripe_size_and_ost_list_parsing():
    assert lfs.parse_stripe_size("64") == 64 * 1024  # under 4096: KiB
    assert lfs.parse_stripe_size("1M") == MiB
    assert lfs.parse_stripe_size("4m") == 4 * MiB
    assert lfs.parse_stripe_size("1048576") == MiB
    assert lfs.parse_ost_list("1,2-4,7") == [1, 2, 3, 4, 7]
    assert lfs.parse_ost_list("0") == [0]


def test_find_argument_parsing():
    paths, filters, maxdepth, print0 = lfs.parse_find_args(
        ["/m/d", "!", "--name", "*.txt", "-s", "+1M", "-M", "-2d", "--maxdepth=1", "-0",
         "-L", "released", "-O", "1,3-4", "-c", "2"], now=1_700_000_000)
    assert paths == ["/m/d"] and maxdepth == 1 and print0
    assert [(f.key, f.negate, f.needs_info) for f in filters] == [
        ("name", True, False), ("size", False, False), ("mtime", False, False),
        ("layout", False, True), ("ost", False, True), ("stripe_count", False, True)]


@pytest.mark.parametrize("argv", [
    ["d", "--type", "x"], ["d", "-s", "1Q"], ["d", "-M", "3q"], ["d", "--bogus"],
    ["d", "-L", "raid5"], ["d", "!"], ["--name"], ["-t", "f"], ["d", "-D", "x"],
])
def test_find_rejects_bad_arguments(capsys, argv):
    rc, _, err = run(capsys, "find", *argv)
    assert rc == 2 and "lfs find: error:" in err


def test_find_value_cmp_rounds_like_find():
    cmp = lfs.find_value_cmp
    assert cmp(MiB, MiB, 0, MiB) and cmp(1, MiB, 0, MiB) and not cmp(0, MiB, 0, MiB)
    assert cmp(MiB + 1, MiB, -1, MiB) and not cmp(MiB, MiB, -1, MiB)  # +1M: above
    assert cmp(0, MiB, 1, MiB) and not cmp(1, MiB, 1, MiB)  # -1M: nothing left over


def test_fid2path_rejects_a_bad_fid_before_looking_it_up(capsys, fake_mount):
    rc, _, err = run(capsys, "fid2path", str(fake_mount.root), "nonsense")
    assert rc == 1 and err == "lfs fid2path: invalid FID 'nonsense'\n"


# --- against a fake mount ----------------------------------------------------

class FakeMount:
    """A directory posing as a lustrefuse mount: xattrs from a dict, requests logged."""

    def __init__(self, root):
        self.root = root
        self.ctl = root / lfs.CTL_NAME
        self.ctl.touch()
        self.infos: dict[str, dict] = {}
        self.sent: list[tuple[str, dict]] = []
        self.refuse: dict[tuple, int] = {}  # (action, ino) -> errno
        self.df = {"fsname": "lustrefuse", "mount": str(root),
                   "mdts": [{"index": 0, "blocks": 1 << 30, "bfree": 1 << 29,
                             "bavail": 1 << 29, "files": 1000, "ffree": 900}],
                   "osts": [{"index": 0, "blocks": 1 << 32, "bfree": 1 << 31,
                             "bavail": 1 << 31, "files": 1000, "ffree": 900}]}

    def add_file(self, name, ino, flags=0, action=None, layout_=None, data=b""):
        path = self.root / name
        path.write_bytes(data)
        lay = layout_ or {"stripe_size": MiB, "stripe_count": 1, "stripe_offset": 0,
                          "osts": [0], "gen": 0, "pattern": "raid0",
                          "released": bool(flags & hsm.RELEASED),
                          "objects": [{"ost": 0, "objid": ino, "group": 0}]}
        self.infos[str(path)] = {"fid": layout.format_fid(ino), "ino": ino, "type": "file",
                                 "hsm": {"flags": flags, "archive_id": 1 if flags else 0},
                                 "action": action or {"action": "NOOP"}, "layout": lay,
                                 "defaults": DEFAULTS, "size": len(data)}
        return str(path)

    def add_dir(self, name, ino, default=None):
        path = self.root / name
        path.mkdir()
        self.infos[str(path)] = {"fid": layout.format_fid(ino), "ino": ino, "type": "dir",
                                 "hsm": {"flags": 0, "archive_id": 0},
                                 "action": {"action": "NOOP"}, "layout": None,
                                 "dir_default": default, "defaults": DEFAULTS}
        return str(path)

    def getxattr(self, path, name, follow_symlinks=True):
        path = os.path.normpath(os.fspath(path))
        if path == str(self.ctl) and name == lfs.XATTR_DF:
            return json.dumps(self.df).encode()
        if path == str(self.ctl) and name.startswith(lfs.XATTR_FID2PATH):
            ino = layout.parse_fid(name[len(lfs.XATTR_FID2PATH):])
            for p, info in self.infos.items():
                if info["ino"] == ino:
                    return os.path.relpath(p, self.root).encode()
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if name == lfs.XATTR_INFO and path in self.infos:
            return json.dumps(self.infos[path]).encode()
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))

    def setxattr(self, path, name, value, *args, **kwargs):
        assert os.fspath(path) == str(self.ctl)
        payload = json.loads(value)
        for ino in payload.get("inos", [payload.get("ino")]):
            err = self.refuse.get((payload.get("action", name), ino))
            if err:
                raise OSError(err, os.strerror(err))
        if name == lfs.XATTR_SETSTRIPE and payload["spec"]["stripe_count"] > 4:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.sent.append((name, payload))


@pytest.fixture
def fake_mount(tmp_path, monkeypatch):
    fake = FakeMount(tmp_path)
    monkeypatch.setattr(lfs, "_lustrefuse_mounts", lambda: [str(tmp_path)])
    monkeypatch.setattr(os, "getxattr", fake.getxattr)
    monkeypatch.setattr(os, "setxattr", fake.setxattr)
    return fake


def test_hsm_state_and_action(capsys, fake_mount):
    stub = fake_mount.add_file("stub", 2, hsm.IMPORTED,
                               {"action": "RESTORE", "state": "running", "bytes": 4096,
                                "offset": 0, "length": -1})
    new = fake_mount.add_file("new", 3)
    rc, out, _ = run(capsys, "hsm_state", stub, new)
    assert rc == 0
    assert out == (f"{stub}: (0x0000000d) released exists archived, archive_id:1\n"
                   f"{new}: (0x00000000)\n")
    rc, out, _ = run(capsys, "hsm", "action", stub, new)
    assert out == f"{stub}: RESTORE running (4096 bytes moved)\n{new}: NOOP\n"


def test_hsm_set_and_clear_send_one_change_per_file(capsys, fake_mount):
    a = fake_mount.add_file("a", 2)
    b = fake_mount.add_file("b", 3)
    rc, _, _ = run(capsys, "hsm_set", "--norelease", "-a", "--archive-id", "2", a, b)
    assert rc == 0
    mask = hsm.NORELEASE | hsm.NOARCHIVE
    assert fake_mount.sent == [
        (lfs.XATTR_HSM_SET, {"inos": [2], "set": mask, "clear": 0, "archive_id": 2}),
        (lfs.XATTR_HSM_SET, {"inos": [3], "set": mask, "clear": 0, "archive_id": 2})]
    fake_mount.sent.clear()
    fake_mount.refuse[(lfs.XATTR_HSM_SET, 2)] = errno.EPERM
    rc, _, err = run(capsys, "hsm_clear", "-e", a, b)
    assert rc == 1
    assert err == f"lfs hsm_clear: change hsm flags for '{a}' failed: Operation not permitted\n"
    assert fake_mount.sent == [
        (lfs.XATTR_HSM_SET, {"inos": [3], "set": 0, "clear": hsm.EXISTS, "archive_id": 0})]


def inos(*paths) -> list[int]:
    """What requests carry for files: their inode numbers as the mount reports them
    (a real mount's st_ino is the MDS inode number)."""
    return [os.stat(p).st_ino for p in paths]


def test_restore_sends_one_request_for_all_files(capsys, fake_mount, tmp_path):
    a = fake_mount.add_file("a", 2, hsm.IMPORTED)
    b = fake_mount.add_file("b", 3, hsm.IMPORTED)
    listed = fake_mount.add_file("c", 4, hsm.IMPORTED)
    filelist = tmp_path / "list.txt"
    filelist.write_text(listed + "\n")
    rc, out, err = run(capsys, "hsm_restore", a, b, "--filelist", str(filelist))
    assert (rc, out, err) == (0, "", "")
    assert fake_mount.sent == [(lfs.XATTR_REQUEST, {"action": "restore",
                                                    "inos": inos(a, b, listed)})]


def test_archive_passes_archive_id_and_data(capsys, fake_mount):
    a = fake_mount.add_file("a", 2)
    rc, _, _ = run(capsys, "hsm_archive", "--archive", "3", "-D", "hello", a)
    assert rc == 0
    assert fake_mount.sent == [(lfs.XATTR_REQUEST, {"action": "archive", "inos": inos(a),
                                                    "archive_id": 3, "data": "hello"})]


def test_request_refused_names_the_first_file(capsys, fake_mount):
    a = fake_mount.add_file("a", 2)
    fake_mount.refuse[("archive", *inos(a))] = errno.EPERM
    rc, _, err = run(capsys, "hsm_archive", a)
    assert rc == 1
    assert err == (f"lfs hsm_archive: Cannot send HSM request (use of {a}): "
                   "Operation not permitted\n")


def test_release_is_one_request(capsys, fake_mount):
    """As Lustre: one request for all the files (the MDS releases all or none), and a
    refusal names the first file."""
    a = fake_mount.add_file("a", 2, hsm.RESIDENT)
    b = fake_mount.add_file("b", 3, hsm.RESIDENT)
    c = fake_mount.add_file("c", 4, hsm.RESIDENT)
    rc, out, err = run(capsys, "hsm_release", a, b, c)
    assert (rc, out, err) == (0, "", "")
    assert fake_mount.sent == [(lfs.XATTR_REQUEST, {"action": "release",
                                                    "inos": inos(a, b, c)})]
    fake_mount.sent.clear()
    fake_mount.refuse[("release", *inos(b))] = errno.EBUSY
    rc, _, err = run(capsys, "hsm_release", a, b, c)
    assert rc == 1
    assert err == (f"lfs hsm_release: Cannot send HSM request (use of {a}): "
                   "Device or resource busy\n")
    assert fake_mount.sent == []


def test_request_batches_fit_an_xattr_value():
    """Many files: as few requests as fit in one extended attribute value each."""
    items = [(f"f{i}", 1_000_000 + i) for i in range(30_000)]
    empty = {"action": "release", "inos": []}
    batches = lfs._request_batches(items, empty)
    assert len(batches) == 5  # 9 bytes an inode number: 7,000-odd a request
    assert [it for b in batches for it in b] == items
    sizes = [len(json.dumps({**empty, "inos": [i for _, i in b]})) for b in batches]
    assert all(lfs.XATTR_SIZE_MAX - 20 < n <= lfs.XATTR_SIZE_MAX for n in sizes[:-1])
    assert sizes[-1] <= lfs.XATTR_SIZE_MAX
    assert lfs._request_batches([], empty) == []


def test_requests_skip_non_regular_files(capsys, fake_mount):
    d = fake_mount.add_dir("d", 5)
    a = fake_mount.add_file("a", 2)
    rc, _, err = run(capsys, "hsm_archive", d, a)
    assert rc == 1
    assert err == f'lfs hsm_archive: error: "{d}" is not a regular file\n'
    assert fake_mount.sent == [(lfs.XATTR_REQUEST, {"action": "archive", "inos": inos(a)})]


def test_remove_by_fid_with_mntpath(capsys, fake_mount):
    rc, _, err = run(capsys, "hsm_remove", "--mntpath", str(fake_mount.root),
                     "[0x200000400:0x9:0x0]", "bad")
    assert rc == 1 and err == "lfs hsm_remove: hsm: 'bad' is not a valid FID\n"
    assert fake_mount.sent == [(lfs.XATTR_REQUEST, {"action": "remove", "inos": [9]})]


def test_getstripe_directory_lists_entries(capsys, fake_mount):
    d = fake_mount.add_dir("d", 5, {"stripe_size": 0, "stripe_count": 2, "stripe_offset": -1})
    f = fake_mount.add_file("d/f", 6)
    os.symlink("f", os.path.join(d, "link"))
    fake_mount.infos[os.path.join(d, "link")] = {"fid": layout.format_fid(7), "ino": 7,
                                                 "type": "link", "layout": None}
    rc, out, _ = run(capsys, "getstripe", d + "/")
    assert rc == 0
    assert out == (
        f"{d}/\n"
        "stripe_count:  2 stripe_size:   1048576 pattern:       raid0 stripe_offset: -1\n\n"
        f"{d}//f\n"
        "lmm_stripe_count:  1\nlmm_stripe_size:   1048576\nlmm_pattern:       raid0\n"
        "lmm_layout_gen:    0\nlmm_stripe_offset: 0\n"
        "\tobdidx\t\t objid\t\t objid\t\t group\n"
        "\t     0\t             6\t          0x6\t             0\n\n"
        f"{d}//link has no stripe info\n")
    rc, out, _ = run(capsys, "getstripe", "-d", d)
    assert out == (
        "stripe_count:  2 stripe_size:   1048576 pattern:       raid0 stripe_offset: -1\n\n")
    rc, out, _ = run(capsys, "getstripe", "-c", f, "-L")
    assert out == "lmm_stripe_count:  1\nlmm_pattern:       raid0\n\n"


def test_setstripe_creates_a_file_with_the_layout(capsys, fake_mount):
    target = str(fake_mount.root / "new")
    fake_mount.infos[target] = {"ino": 11, "type": "file"}  # what the daemon will say
    rc, _, _ = run(capsys, "setstripe", "-c", "2", "-S", "4M", "-i", "1", target)
    assert rc == 0 and os.path.exists(target)
    assert fake_mount.sent == [(lfs.XATTR_SETSTRIPE, {"ino": 11, "spec": {
        "stripe_size": 4 * MiB, "stripe_count": 2, "stripe_offset": 1, "ost_list": []}})]
    rc, _, err = run(capsys, "setstripe", "-c", "2", target)
    assert rc == 1
    assert err == f"lfs setstripe: setstripe error for '{target}': stripe already set\n"


def test_setstripe_refused_leaves_no_file(capsys, fake_mount):
    target = str(fake_mount.root / "wide")
    fake_mount.infos[target] = {"ino": 12, "type": "file"}
    rc, _, err = run(capsys, "setstripe", "-c", "8", target)
    assert rc == 1 and "Invalid argument" in err
    assert not os.path.exists(target)


def test_setstripe_directory_default_and_delete(capsys, fake_mount):
    d = fake_mount.add_dir("d", 5)
    assert run(capsys, "setstripe", "-o", "1,3", d)[0] == 0
    assert run(capsys, "setstripe", "-d", d)[0] == 0
    assert fake_mount.sent == [
        (lfs.XATTR_SETSTRIPE, {"ino": 5, "spec": {"stripe_size": 0, "stripe_count": 0,
                                                  "stripe_offset": 1, "ost_list": [1, 3]}}),
        (lfs.XATTR_SETSTRIPE, {"ino": 5, "spec": {"stripe_size": 0, "stripe_count": 0,
                                                  "stripe_offset": -1, "ost_list": []}})]


def test_df_uses_the_mount_root(capsys, fake_mount):
    rc, out, _ = run(capsys, "df", "-h", str(fake_mount.root))
    root = str(fake_mount.root)
    assert rc == 0  # exactly 1 GiB prints as 1024.0M, as lfs.c's COOK() does
    assert out.splitlines()[1] == (
        f"lustrefuse-MDT0000_UUID     1024.0M      512.0M      512.0M  50% {root}[MDT:0]")
    assert out.splitlines()[4] == (
        f"filesystem_summary:         4.0G        2.0G        2.0G  50% {root}")


def test_path2fid_and_fid2path(capsys, fake_mount):
    a = fake_mount.add_file("a", 2)
    b = fake_mount.add_file("b", 3)
    assert run(capsys, "path2fid", a)[1] == "[0x200000400:0x2:0x0]\n"
    assert run(capsys, "path2fid", a, b)[1] == (
        f"{a}: [0x200000400:0x2:0x0]\n{b}: [0x200000400:0x3:0x0]\n")
    root = str(fake_mount.root)
    rc, out, _ = run(capsys, "fid2path", root, "0x200000400:0x3:0x0")
    assert (rc, out) == (0, f"{root}/b\n")
    assert run(capsys, "fid2path", "lustrefuse", "[0x200000400:0x3:0x0]")[1] == "b\n"
    rc, _, err = run(capsys, "fid2path", root, "[0x200000400:0x63:0x0]")
    assert rc == 1 and "No such file or directory" in err


def test_find_by_layout_name_and_size(capsys, fake_mount):
    d = fake_mount.add_dir("d", 5)
    stub = fake_mount.add_file("d/stub.dat", 6, hsm.IMPORTED)
    small = fake_mount.add_file("d/small.txt", 7, data=b"x" * 10)
    rc, out, _ = run(capsys, "find", d, "-L", "released")
    assert (rc, out) == (0, f"{stub}\n")
    rc, out, _ = run(capsys, "find", d, "!", "--layout", "released", "-t", "f")
    assert out == f"{small}\n"
    rc, out, _ = run(capsys, "find", d, "--name", "*.txt", "-s", "-2K", "-0")
    assert out == f"{small}\0"
    rc, out, _ = run(capsys, "find", d, "--maxdepth", "0")
    assert out == f"{d}\n"
