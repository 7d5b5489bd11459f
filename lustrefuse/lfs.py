"""``lfs``: Lustre's client command, for files in a lustrefuse mount.

Lustre's lfs talks to the kernel with ioctls; FUSE has none, so this one reads
state with getxattr and sends requests with setxattr on the hidden control
file at the mount root (DESIGN.md "Control path"):

* ``getxattr(PATH, "lustrefuse.info")``: JSON with fid, ino, type, hsm,
  action, layout, dir_default, defaults, size and times;
* ``getxattr(CTL, "lustrefuse.df")`` and ``"lustrefuse.fid2path.<FID>"``;
* ``setxattr(CTL, "lustrefuse.request" | "lustrefuse.hsm_set" |
  "lustrefuse.setstripe", JSON)``; a refusal comes back as an OSError.

Options and messages follow Lustre's getopt and lfs.c; output comes from
lfsfmt. Errors print one line, the next file is still processed, and the exit
status is 1 if anything failed (2 for usage errors).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import functools
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import hsm, layout
from .lfsfmt import (
    Show,
    df_text,
    getstripe_dir,
    getstripe_file,
    hsm_action_line,
    hsm_state_line,
    layout_objects,
    layout_pattern,
    no_stripe_info,
)

CTL_NAME = ".lustrefuse_ctl"
FSTYPES = ("fuse.lustrefuse", "fuseblk.lustrefuse")
XATTR_INFO = "lustrefuse.info"
XATTR_DF = "lustrefuse.df"
XATTR_FID2PATH = "lustrefuse.fid2path."
XATTR_REQUEST = "lustrefuse.request"
XATTR_HSM_SET = "lustrefuse.hsm_set"
XATTR_SETSTRIPE = "lustrefuse.setstripe"

LOV_V1_INSANE_STRIPE_COUNT = 65532  # highest OST index setstripe -i accepts


class NotLustre(Exception):
    """The path is not in a lustrefuse mount (Lustre answers ENOTTY)."""


# --- finding the mount ------------------------------------------------------

def _lustrefuse_mounts() -> list[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    # /proc/mounts writes space, tab, newline and backslash as octal escapes
    unescape = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)))
    return [unescape(fields[1]) for fields in map(str.split, lines)
            if len(fields) > 2 and fields[2] in FSTYPES]


def _device_root(real: str) -> str:
    """The top of the filesystem holding ``real``: walk up while st_dev stays."""
    cur = real
    while not os.path.lexists(cur) and cur != os.path.dirname(cur):
        cur = os.path.dirname(cur)
    dev = os.lstat(cur).st_dev
    while True:
        parent = os.path.dirname(cur)
        try:
            if parent == cur or os.lstat(parent).st_dev != dev:
                return cur
        except OSError:
            return cur
        cur = parent


def _has_ctl(root: str) -> bool:
    try:
        os.stat(os.path.join(root, CTL_NAME))
    except OSError:
        return False
    return True


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mount_root(path: str, follow: bool = True) -> str | None:
    """The lustrefuse mount root holding ``path``, or None.

    Mounts of type fuse.lustrefuse are tried longest first, then the top of
    the path's device; a root counts only if its control file answers.
    """
    if follow:
        real = os.path.realpath(path)
    else:
        head, tail = os.path.split(os.path.abspath(path))
        real = os.path.join(os.path.realpath(head), tail)
    candidates = sorted((m for m in _lustrefuse_mounts() if _under(real, m)),
                        key=len, reverse=True)
    try:
        candidates.append(_device_root(real))
    except OSError:
        pass
    return next((root for root in candidates if _has_ctl(root)), None)


def _ctl(root: str) -> str:
    return os.path.join(root, CTL_NAME)


def _lustre_path(path: str, follow: bool = True) -> str:
    """Check ``path`` exists and is in a lustrefuse mount; return the mount root."""
    (os.stat if follow else os.lstat)(path)
    root = mount_root(path, follow)
    if root is None:
        raise NotLustre(path)
    return root


def _read_json(path: str, name: str, follow: bool = True):
    raw = os.getxattr(path, name, follow_symlinks=follow)
    try:
        return json.loads(raw)
    except ValueError:
        raise OSError(errno.EIO, f"malformed {name} reply") from None


def _info(path: str, follow: bool = True) -> dict:
    return _read_json(path, XATTR_INFO, follow)


def _send(root: str, name: str, payload: dict) -> None:
    os.setxattr(_ctl(root), name, json.dumps(payload).encode())


# --- output and errors ------------------------------------------------------

def _out(text: str) -> None:
    sys.stdout.write(text)


def _error(cmd: str, message: str) -> None:
    sys.stdout.flush()  # keep stdout and stderr in order on a terminal
    print(f"lfs {cmd}: {message}", file=sys.stderr)


def _strerror(exc: OSError) -> str:
    return exc.strerror or os.strerror(exc.errno or errno.EIO)


def _for_each(cmd: str, paths, failed: str, action: Callable[[str], None]) -> int:
    """Run ``action`` on every path; report a failure as ``<failed>: <strerror>``."""
    rc = 0
    for path in paths:
        try:
            action(path)
        except NotLustre:
            _error(cmd, f"'{path}' is not on a Lustre filesystem: {os.strerror(errno.ENOTTY)}")
            rc = 1
        except OSError as e:
            _error(cmd, f"{failed.format(path)}: {_strerror(e)}")
            rc = 1
        except (KeyError, TypeError, ValueError) as e:
            _error(cmd, f"{failed.format(path)}: unexpected reply from lustrefuse ({e!r})")
            rc = 1
    return rc


# --- command table ----------------------------------------------------------

@dataclass
class Command:
    name: str
    summary: str
    usage: str
    build: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.ArgumentParser, argparse.Namespace], int]
    add_help: bool = True  # df needs -h for --human-readable

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"lfs {self.name}", description=self.summary,
                                    epilog=f"Lustre usage: {self.usage}",
                                    add_help=self.add_help)
        self.build(p)
        return p


COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, usage: str, build: Callable, add_help: bool = True):
    def register(run):
        COMMANDS[name] = Command(name, summary, usage, build, run, add_help)
        return run
    return register


def _files_arg(p: argparse.ArgumentParser, nargs: str = "+") -> None:
    p.add_argument("files", nargs=nargs, metavar="FILE")


# --- hsm_state, hsm_action ---------------------------------------------------

@command("hsm_state", "Display the HSM state flags and archive id of files.",
         "hsm_state FILE ...", _files_arg)
def _hsm_state(p, a) -> int:
    def show(path):
        _lustre_path(path)
        state = _info(path).get("hsm") or {}
        _out(hsm_state_line(path, state.get("flags", 0), state.get("archive_id", 0)) + "\n")
    return _for_each("hsm_state", a.files, "get HSM state for '{}' failed", show)


@command("hsm_action", "Display the HSM request in progress for files (NOOP if none).",
         "hsm_action FILE ...", _files_arg)
def _hsm_action(p, a) -> int:
    def show(path):
        _lustre_path(path)
        _out(hsm_action_line(path, _info(path).get("action")) + "\n")
    return _for_each("hsm_action", a.files, "get HSM action for '{}' failed", show)


# --- hsm_set, hsm_clear ------------------------------------------------------

_FLAG_OPTIONS = (  # getopt "aAdehi:lr"
    ("-r", "--norelease", hsm.NORELEASE, "never release the file's data"),
    ("-a", "--noarchive", hsm.NOARCHIVE, "never archive the file"),
    ("-d", "--dirty", hsm.DIRTY, "the file changed since it was archived"),
    ("-e", "--exists", hsm.EXISTS, "an archive copy exists (root only)"),
    ("-A", "--archived", hsm.ARCHIVED, "the archive copy is complete (root only)"),
    ("-l", "--lost", hsm.LOST, "the archive copy is lost (root only)"),
)


def _flag_args(with_archive_id: bool) -> Callable:
    def build(p):
        for short, long, bit, text in _FLAG_OPTIONS:
            p.add_argument(short, long, dest="mask", action="append_const", const=bit,
                           default=[], help=text)
        if with_archive_id:
            p.add_argument("-i", "--archive-id", type=int, default=0, metavar="NUM",
                           help="archive id to record (0: no change)")
        _files_arg(p)
    return build


def _change_flags(cmd: str, p, a, setting: bool) -> int:
    mask = functools.reduce(int.__or__, a.mask, 0)
    if not mask:
        p.error("give at least one flag to change")
    archive_id = getattr(a, "archive_id", 0)
    if archive_id < 0:
        p.error(f"invalid archive_id: '{archive_id}'")

    def change(path):
        root = _lustre_path(path)
        _send(root, XATTR_HSM_SET, {"inos": [_info(path)["ino"]],
                                    "set": mask if setting else 0,
                                    "clear": 0 if setting else mask,
                                    "archive_id": archive_id})
    return _for_each(cmd, a.files, "change hsm flags for '{}' failed", change)


@command("hsm_set", "Set HSM flags on files.",
         "hsm_set [--norelease] [--noarchive] [--dirty] [--exists] [--archived] [--lost] "
         "[--archive-id NUM] FILE ...", _flag_args(True))
def _hsm_set(p, a) -> int:
    return _change_flags("hsm_set", p, a, True)


@command("hsm_clear", "Clear HSM flags on files.",
         "hsm_clear [--norelease] [--noarchive] [--dirty] [--exists] [--archived] [--lost] "
         "FILE ...", _flag_args(False))
def _hsm_clear(p, a) -> int:
    return _change_flags("hsm_clear", p, a, False)


# --- hsm requests ------------------------------------------------------------

def _request_args(p: argparse.ArgumentParser) -> None:  # getopt "a:D:hl:m:"
    p.add_argument("-l", "--filelist", metavar="FILELIST",
                   help="read more file names from FILELIST, one per line")
    p.add_argument("-D", "--data", help="opaque data passed to the copytool")
    p.add_argument("-a", "--archive", type=int, metavar="NUM",
                   help="archive id (hsm_archive and hsm_remove only)")
    p.add_argument("-m", "--mntpath", metavar="MOUNTPATH",
                   help="the arguments are FIDs of files in the mount at MOUNTPATH")
    _files_arg(p, "*")


def _request_items(cmd: str, a) -> tuple[str | None, list[tuple[str, int]], int]:
    """The mount root and (name, ino) of every valid item; rc 1 if any was bad."""
    names = list(a.files)
    if a.filelist:
        with open(a.filelist, encoding="utf-8", errors="surrogateescape") as f:
            names += [line.rstrip("\n") for line in f if line.strip()]
    rc, items, root = 0, [], None
    if a.mntpath:
        root = mount_root(a.mntpath)
        if root is None:
            _error(cmd, f"'{a.mntpath}' is not on a Lustre filesystem: "
                        f"{os.strerror(errno.ENOTTY)}")
            return None, [], 1
        for name in names:
            try:
                items.append((name, layout.parse_fid(name)))
            except ValueError:
                _error(cmd, f"hsm: '{name}' is not a valid FID")
                rc = 1
        return root, items, rc
    roots: dict[tuple[int, str], str | None] = {}
    for name in names:
        try:
            st = os.lstat(name)
        except OSError as e:
            _error(cmd, f"Cannot stat {name}: {_strerror(e)}")
            rc = 1
            continue
        if not stat.S_ISREG(st.st_mode):
            _error(cmd, f'error: "{name}" is not a regular file')
            rc = 1
            continue
        # one mount lookup a directory, not a file (it reads /proc/self/mounts and stats
        # the path's ancestors: ~1 ms, ten seconds for 10,000 files)
        where = (st.st_dev, os.path.dirname(os.path.abspath(name)))
        if where not in roots:
            roots[where] = mount_root(name)
        here = roots[where]
        if here is None:
            _error(cmd, f"'{name}' is not on a Lustre filesystem: {os.strerror(errno.ENOTTY)}")
            rc = 1
        elif root is not None and here != root:
            _error(cmd, f"All files should be on the same filesystem: {name}")
            rc = 1
        else:
            # the mount reports each file's inode number (its FID's sequence) as st_ino:
            # no round trip to the MDS a file, as llapi_path2fid needs none on Lustre
            items.append((name, st.st_ino))
            root = here
    return root, items, rc


XATTR_SIZE_MAX = 65536  # the kernel's limit on an extended attribute value


def _request_batches(items: list[tuple[str, int]], empty: dict) -> list[list[tuple[str, int]]]:
    """``items`` in as few requests as fit: each request is ``empty`` with the inode
    numbers of its items as "inos", JSON-encoded by ``_send`` within XATTR_SIZE_MAX."""
    base = len(json.dumps(empty).encode())
    batches: list[list[tuple[str, int]]] = []
    size = base
    for item in items:
        n = len(str(item[1])) + 2  # the number and its ", "
        if not batches or size + n > XATTR_SIZE_MAX:
            batches.append([])
            size = base
        batches[-1].append(item)
        size += n
    return batches


def _hsm_request(action: str):
    def run(p, a) -> int:
        cmd = f"hsm_{action}"
        if a.archive is not None and action not in ("archive", "remove"):
            p.error("-a is supported only when archiving or removing")
        if not a.files and not a.filelist:
            p.error("give FILEs or --filelist")
        try:
            root, items, rc = _request_items(cmd, a)
        except OSError as e:
            _error(cmd, f"Cannot read the file list {a.filelist}: {_strerror(e)}")
            return 1
        extra = {k: v for k, v in (("archive_id", a.archive), ("data", a.data)) if v is not None}
        # one request, as Lustre sends it (a release of them all is all or nothing), cut
        # only where it would not fit in one extended attribute value
        for batch in _request_batches(items, {"action": action, "inos": [], **extra}):
            try:
                _send(root, XATTR_REQUEST,
                      {"action": action, "inos": [ino for _, ino in batch], **extra})
            except OSError as e:
                _error(cmd, f"Cannot send HSM request (use of {batch[0][0]}): {_strerror(e)}")
                rc = 1
        return rc
    return run


for _action, _summary in (
        ("archive", "Archive files to the linked S3 repository (asynchronous)."),
        ("restore", "Restore released files from the repository (asynchronous)."),
        ("release", "Release the local data of archived, clean files."),
        ("remove", "Remove the archive copy of files."),
        ("cancel", "Cancel HSM requests on files.")):
    _usage = (f"hsm_{_action} [--filelist FILELIST] [--data DATA]"
              + (" [--archive NUM]" if _action in ("archive", "remove") else "")
              + (" {FILE ... | --mntpath MOUNTPATH FID ...}" if _action == "remove"
                 else " FILE ..."))
    command(f"hsm_{_action}", _summary, _usage, _request_args)(_hsm_request(_action))


# --- getstripe ---------------------------------------------------------------

_FIELD_OPTIONS = (
    ("-c", ("--stripe-count", "--stripe_count"), Show.COUNT, "print only the stripe count"),
    ("-S", ("--stripe-size", "--stripe_size"), Show.SIZE, "print only the stripe size"),
    ("-i", ("--stripe-index", "--stripe_index", "--index"), Show.OFFSET,
     "print only the first OST index"),
    ("-L", ("--layout",), Show.PATTERN, "print only the layout pattern"),
    ("-g", ("--generation",), Show.GEN, "print only the layout generation"),
    ("-F", ("--fid",), Show.FID, "print only the FID"),
)


def _getstripe_args(p: argparse.ArgumentParser) -> None:
    for short, longs, bit, text in _FIELD_OPTIONS:
        p.add_argument(short, *longs, dest="fields", action="append_const", const=bit,
                       default=[], help=text)
    p.add_argument("-d", "--directory", action="store_true",
                   help="show a directory's default layout, not its entries")
    p.add_argument("-D", "--default", action="store_true", help="same as -d")
    p.add_argument("-m", "--mdt-index", "--mdt", "--mdt_index", action="store_true",
                   help="print the MDT index (always 0)")
    p.add_argument("-O", "--ost", "--obd", metavar="OST",
                   help="only files with a stripe on OST (index or UUID)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the objects")
    p.add_argument("-r", "--recursive", action="store_true", help="recurse into directories")
    p.add_argument("-R", "--raw", action="store_true", help="do not substitute defaults")
    p.add_argument("-v", "--verbose", action="store_true", help="also magic, seq, object id")
    p.add_argument("-y", "--yaml", action="store_true", help="print in YAML")
    p.add_argument("--no-follow", action="store_true", help="do not follow a symlink argument")
    p.add_argument("files", nargs="+", metavar="FILE|DIR")


def _ost_index(text: str) -> int | None:
    """-O takes an index or a target UUID such as lustrefuse-OST0001_UUID."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    head, sep, tail = text.partition("-OST")
    try:
        return int(tail[:4], 16) if sep and len(tail) >= 4 else None
    except ValueError:
        return None


def _child(path: str, name: str) -> str:
    return f"{path}/{name}"  # Lustre joins verbatim: "dir/" gives "dir//file"


@command("getstripe", "List the layout of files, or the default layout of directories.",
         "getstripe [--stripe-count|-c] [--stripe-size|-S] [--stripe-index|-i] [--layout|-L] "
         "[--generation|-g] [--fid|-F] [--directory|-d] [--quiet|-q] [--verbose|-v] "
         "[--yaml|-y] [--recursive|-r] [--raw|-R] [--ost|-O OST] FILE|DIR ...",
         _getstripe_args)
def _getstripe(p, a) -> int:
    show = functools.reduce(Show.__or__, a.fields, Show(0))
    depth = 0 if show or a.directory or a.default or a.mdt_index else 1  # 0: no entries
    if a.verbose:
        show, depth = Show.DEFAULT | Show.DETAIL, 1
    show = Show.OBJID if a.quiet else show or Show.DEFAULT
    if a.recursive:
        depth = -1
    ost = None
    if a.ost is not None:
        ost = _ost_index(a.ost)
        if ost is None:
            p.error(f"invalid OST '{a.ost}'")

    def block(path: str, info: dict) -> str:
        if a.mdt_index:
            return "0\n"
        if info.get("type") == "dir":
            if ost is not None:
                return ""
            return getstripe_dir(path, info.get("dir_default"), info.get("defaults") or {},
                                 show, print_path=depth != 0, yaml=a.yaml, raw=a.raw)
        if not info.get("layout"):
            return "" if ost is not None else no_stripe_info(path)
        return getstripe_file(path, info["fid"], info["layout"], show,
                              print_path=depth != 0, yaml=a.yaml, ost=ost)

    entry_failed = False

    def visit(path: str, level: int, follow: bool) -> None:
        nonlocal entry_failed
        info = _info(path, follow)
        _out(block(path, info))
        if info.get("type") == "dir" and (depth < 0 or level < depth):
            for name in sorted(os.listdir(path)):
                child = _child(path, name)
                try:
                    visit(child, level + 1, False)
                except OSError as e:  # report it, go on with the next entry
                    _error("getstripe", f"cannot get layout for '{child}': {_strerror(e)}")
                    entry_failed = True

    def top(path):
        _lustre_path(path, not a.no_follow)
        visit(path, 0, not a.no_follow)
    rc = _for_each("getstripe", a.files, "cannot get layout for '{}'", top)
    return rc or int(entry_failed)


# --- setstripe ---------------------------------------------------------------

def _setstripe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--stripe-count", "--stripe_count", "--count", dest="count",
                   metavar="STRIPE_COUNT", help="number of OSTs to stripe over (-1: all)")
    p.add_argument("-S", "--stripe-size", "--stripe_size", "--size", dest="size",
                   metavar="STRIPE_SIZE", help="bytes per stripe, multiple of 64KiB [KMG]")
    p.add_argument("-i", "--stripe-index", "--stripe_index", "--index", dest="index",
                   metavar="START_OST_IDX", help="first OST (-1: the MDS chooses)")
    p.add_argument("-o", "--ost", "--ost-list", dest="ost_list", metavar="OST_INDICES",
                   help="exact OSTs to use, e.g. 1,2-4,7")
    p.add_argument("-L", "--layout", metavar="PATTERN", help="raid0 (the only one here)")
    p.add_argument("-p", "--pool", metavar="POOL_NAME", help="OST pool (not supported)")
    p.add_argument("-E", "--component-end", "--comp-end", metavar="COMP_END",
                   help="composite layouts (not supported)")
    p.add_argument("-d", "--delete", action="store_true",
                   help="delete the default layout of a directory")
    p.add_argument("files", nargs="+", metavar="DIR|FILE")


def parse_ost_list(text: str) -> list[int]:
    """``1,2-4,7`` -> [1, 2, 3, 4, 7] (Lustre's parse_targets)."""
    osts: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ValueError(text)
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(text)
        osts.extend(range(first, last + 1))
    return osts


def parse_stripe_size(text: str) -> int:
    """-S: a size with optional KMGT suffix; values under 4096 mean KiB."""
    size = layout.parse_size(text)
    if size < 4096:
        size *= 1024
    if size % layout.MIN_STRIPE_SIZE or size > layout.MAX_STRIPE_SIZE:
        raise ValueError(text)
    return size


def setstripe_spec(p: argparse.ArgumentParser, a) -> layout.StripeSpec:
    """Validate setstripe's options the way lfs does; usage errors exit 2."""
    if a.pool:
        p.error("OST pools are not supported by lustrefuse")
    if a.component_end:
        p.error("composite (-E) layouts are not supported by lustrefuse")
    if a.layout not in (None, "raid0"):
        p.error(f"layout '{a.layout}' is not supported, only 'raid0'")
    count = size = 0
    index = -1
    osts: list[int] = []
    if a.count is not None:
        try:
            count = int(a.count, 0)
        except ValueError:
            count = -2
        if not -1 <= count <= layout.MAX_STRIPE_COUNT:
            p.error(f"invalid stripe count '{a.count}'")
    if a.size is not None:
        try:
            size = parse_stripe_size(a.size)
        except ValueError:
            p.error(f"invalid stripe size '{a.size}'")
    if a.index is not None:
        try:
            index = int(a.index, 0)
        except ValueError:
            index = -2
        if not -1 <= index <= LOV_V1_INSANE_STRIPE_COUNT:
            p.error(f"invalid stripe offset '{a.index}'")
    if a.ost_list is not None:
        try:
            osts = parse_ost_list(a.ost_list)
        except ValueError:
            p.error(f"invalid OST target(s) '{a.ost_list}'")
        if count > 0 and count != len(osts):
            p.error(f"stripe count {count} doesn't match the number of OSTs: {len(osts)}")
        if index == -1:
            index = osts[0]
    if a.delete and (a.count or a.size or a.index or a.ost_list):
        p.error("option -d is mutually exclusive with -S, -c, -i and -o options")
    return layout.StripeSpec(size, count, index, tuple(osts))


@command("setstripe", "Create a file with a layout, or set a directory's default layout.",
         "setstripe [--stripe-count|-c N] [--stripe-size|-S SIZE] [--stripe-index|-i IDX] "
         "[--ost|-o OST_INDICES] DIR|FILE ...  or  setstripe --delete|-d DIR",
         _setstripe_args)
def _setstripe(p, a) -> int:
    spec = setstripe_spec(p, a)

    def apply(path):
        if a.delete or os.path.isdir(path):
            root = _lustre_path(path)
            info = _info(path)
            if info.get("type") != "dir":
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            _send(root, XATTR_SETSTRIPE, {"ino": info["ino"], "spec": spec.to_dict()})
            return
        # a new file: check the mount first so nothing is created elsewhere
        root = mount_root(os.path.dirname(os.path.abspath(path)))
        if root is None:
            raise NotLustre(path)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise OSError(errno.EEXIST, "stripe already set") from None
        try:
            _send(root, XATTR_SETSTRIPE, {"ino": _info(path)["ino"], "spec": spec.to_dict()})
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a refused layout leaves no file behind
            raise
    return _for_each("setstripe", a.files, "setstripe error for '{}'", apply)


# --- df ------------------------------------------------------------------------

def _df_args(p: argparse.ArgumentParser) -> None:  # getopt "hHilp:v"
    p.add_argument("-h", "--human-readable", dest="human", action="store_true",
                   help="sizes in powers of 1024 (K, M, G...)")
    p.add_argument("-H", "--si", action="store_true", help="sizes in powers of 1000")
    p.add_argument("-i", "--inodes", action="store_true", help="inodes instead of blocks")
    p.add_argument("-l", "--lazy", action="store_true", help="accepted, no effect")
    p.add_argument("-v", "--verbose", action="store_true", help="accepted, no effect")
    p.add_argument("--help", action="help", help="show this help message and exit")
    p.add_argument("paths", nargs="*", metavar="PATH")


@command("df", "Report space and inode usage of each MDT and OST, and the total.",
         "df [--inodes|-i] [--human-readable|-h] [--si|-H] [--lazy|-l] [PATH]", _df_args,
         add_help=False)
def _df(p, a) -> int:
    def show(root: str) -> None:
        stats = _read_json(_ctl(root), XATTR_DF)
        _out(df_text(stats, root, cooked=a.human or a.si, decimal=a.si, inodes=a.inodes))

    if not a.paths:
        roots = [m for m in _lustrefuse_mounts() if _has_ctl(m)]
        if not roots:
            _error("df", "no lustrefuse filesystem is mounted")
            return 1
        return _for_each("df", roots, "cannot statfs '{}'", show)
    return _for_each("df", a.paths, "cannot statfs '{}'",
                     lambda path: show(_lustre_path(path)))


# --- path2fid, fid2path ------------------------------------------------------

def _path2fid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--parents", action="store_true",
                   help="print the parent directory's FID and the name instead")
    _files_arg(p)


@command("path2fid", "Display the FID of paths.", "path2fid [--parents] PATH ...",
         _path2fid_args)
def _path2fid(p, a) -> int:
    prefix = len(a.files) > 1

    def show(path):
        _lustre_path(path, follow=False)
        if a.parents:
            parent = os.path.dirname(os.path.abspath(path))
            fid = f"{_info(parent)['fid']}/{os.path.basename(os.path.abspath(path))}"
        else:
            fid = _info(path, follow=False)["fid"]
        _out(f"{path}: {fid}\n" if prefix else fid + "\n")
    what = "cannot get parent fid for '{}'" if a.parents else "cannot get fid for '{}'"
    return _for_each("path2fid", a.files, what, show)


def _fid2path_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--print-fid", action="store_true", help="print the FID first")
    p.add_argument("-c", "--print-link", "--cur", "--current", action="store_true",
                   help="print the link number first")
    p.add_argument("-l", "--link", type=int, metavar="LINKNO", help="accepted; one link here")
    p.add_argument("root", metavar="FSNAME|ROOT")
    p.add_argument("fids", nargs="+", metavar="FID")


def _root_by_fsname(fsname: str) -> str | None:
    for root in _lustrefuse_mounts():
        try:
            if _has_ctl(root) and _read_json(_ctl(root), XATTR_DF).get("fsname") == fsname:
                return root
        except OSError:
            continue
    return None


@command("fid2path", "Display the path(s) of FIDs.",
         "fid2path [--print-fid|-f] [--print-link|-c] [--link|-l LINKNO] FSNAME|ROOT FID ...",
         _fid2path_args)
def _fid2path(p, a) -> int:
    by_path = a.root.startswith("/")
    root = mount_root(a.root) if by_path else _root_by_fsname(a.root)
    if root is None:
        _error("fid2path", f"cannot resolve mount point for '{a.root}': "
                           f"{os.strerror(errno.ENODEV)}")
        return 1
    rc = 0
    for text in a.fids:
        try:
            fid = layout.format_fid(layout.parse_fid(text))
        except ValueError:
            _error("fid2path", f"invalid FID '{text}'")
            rc = 1
            continue
        try:
            raw = os.getxattr(_ctl(root), XATTR_FID2PATH + fid)
        except OSError as e:
            _error("fid2path", f"cannot find '{a.root}' {text}: {_strerror(e)}")
            rc = 1
            continue
        rel = raw.decode("utf-8", "surrogateescape").strip("/")
        # as lfs.c: "ROOT/rel" when named by mount path, "rel" by fsname ("/" for the root)
        path = f"{root.rstrip('/')}/{rel}" if by_path else rel or "/"
        _out(("" if not a.print_fid else text + " ")
             + ("" if not a.print_link else "0 ") + path + "\n")
    return rc


# --- find ----------------------------------------------------------------------

_FIND_VALUE_OPTS = {  # option -> filter key; every one takes a value
    "-A": "atime", "--atime": "atime", "-M": "mtime", "--mtime": "mtime",
    "-C": "ctime", "--ctime": "ctime", "-s": "size", "--size": "size",
    "-t": "type", "--type": "type", "-n": "name", "--name": "name",
    "-c": "stripe_count", "--stripe-count": "stripe_count", "--stripe_count": "stripe_count",
    "-S": "stripe_size", "--stripe-size": "stripe_size", "--stripe_size": "stripe_size",
    "-O": "ost", "--ost": "ost", "--obd": "ost", "-L": "layout", "--layout": "layout",
    "-D": "maxdepth", "--maxdepth": "maxdepth",
}
_FIND_FLAGS = {"-0": "print0", "--print0": "print0", "-P": "print", "--print": "print",
               "-l": "lazy", "--lazy": "lazy"}
_FIND_USAGE = ("find DIR|FILE ... [[!] --atime|-A [+-]N[smhdwy]] [[!] --mtime|-M [+-]N[smhdwy]] "
               "[[!] --ctime|-C [+-]N[smhdwy]] [[!] --size|-s [+-]N[KMGTPE]] "
               "[[!] --type|-t {b,c,d,f,l,p,s}] [[!] --name|-n PATTERN] "
               "[[!] --stripe-count|-c [+-]N] [[!] --stripe-size|-S [+-]N[KMG]] "
               "[[!] --ost|-O INDEX,...] [[!] --layout|-L released,raid0,mdt] "
               "[--maxdepth|-D N] [--print|-P] [--print0|-0]")
_TYPES = {"b": stat.S_IFBLK, "c": stat.S_IFCHR, "d": stat.S_IFDIR, "f": stat.S_IFREG,
          "l": stat.S_IFLNK, "p": stat.S_IFIFO, "s": stat.S_IFSOCK}
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
               "P": 1 << 50, "E": 1 << 60}
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_LAYOUTS = ("released", "raid0", "mdt")


class FindUsage(ValueError):
    """A bad ``lfs find`` argument (usage error, exit 2)."""


def _signed(text: str) -> tuple[int, str]:
    """``+N`` (more than) -> -1, ``-N`` (less than) -> 1, as lfs find stores it."""
    if text[:1] == "+":
        return -1, text[1:]
    if text[:1] == "-":
        return 1, text[1:]
    return 0, text


def find_value_cmp(value: int, limit: int, sign: int, margin: int) -> bool:
    """liblustreapi find_value_cmp: ``N`` matches (N-margin, N], ``-N`` up to
    N-margin, ``+N`` above N, like find(1) rounding sizes and ages up."""
    if sign > 0:
        return value + margin <= limit
    if sign < 0:
        return value > limit
    return limit - margin < value <= limit


def _parse_size_filter(text: str, kib_below_4096: bool = False) -> tuple[int, int, int]:
    sign, rest = _signed(text)
    unit = rest[-1:].upper() if rest[-1:].isalpha() else ""
    digits = rest[: len(rest) - len(unit)]
    if unit not in _SIZE_UNITS or not digits.isdigit():
        raise FindUsage(f"bad size '{text}'")
    value = int(digits) * _SIZE_UNITS[unit]
    if kib_below_4096 and value < 4096:  # stripe sizes: small values mean KiB
        value *= 1024
    return sign, value, _SIZE_UNITS[unit]


def _parse_time_filter(text: str) -> tuple[int, int, int]:
    """``[+-]N[smhdwy]`` (days without a unit; ``1d12h`` adds up) -> sign, age, margin.

    The margin, the smallest unit given, is how much a "N units ago" spans."""
    sign, rest = _signed(text)
    if not rest or not re.fullmatch(r"(\d+[smhdwy])*\d*", rest):
        raise FindUsage(f"bad time '{text}'")
    age = margin = 0
    for number, unit in re.findall(r"(\d+)([smhdwy]?)", rest):
        seconds = _TIME_UNITS[unit or "d"]
        age += int(number) * seconds
        margin = min(margin or seconds, seconds)
    return sign, age, margin


@dataclass
class _Filter:
    key: str
    negate: bool
    test: Callable[[str, os.stat_result, Callable[[], dict]], bool]
    needs_info: bool = False


def _make_filter(key: str, value: str, negate: bool, now: float) -> _Filter:
    if key == "type":
        if value not in _TYPES:
            raise FindUsage(f"bad type '{value}'")
        return _Filter(key, negate, lambda p, st, info: stat.S_IFMT(st.st_mode) == _TYPES[value])
    if key == "name":
        return _Filter(key, negate,
                       lambda p, st, info: fnmatch.fnmatchcase(os.path.basename(p), value))
    if key == "size":
        sign, limit, units = _parse_size_filter(value)
        return _Filter(key, negate,
                       lambda p, st, info: find_value_cmp(st.st_size, limit, sign, units))
    if key in ("atime", "mtime", "ctime"):
        sign, age, margin = _parse_time_filter(value)
        # an age is a time in the past: "older" flips the comparison's sign
        limit = int(now) - age
        return _Filter(key, negate, lambda p, st, info: find_value_cmp(
            int(getattr(st, f"st_{key}")), limit, -sign, margin))
    if key in ("stripe_count", "stripe_size"):
        if key == "stripe_count":
            sign, digits = _signed(value)
            if not digits.isdigit():
                raise FindUsage(f"bad stripe count '{value}'")
            limit, units = int(digits), 1
        else:
            sign, limit, units = _parse_size_filter(value, kib_below_4096=True)
        field = key

        def test(p, st, info):
            lay = info().get("layout") if stat.S_ISREG(st.st_mode) else None
            return bool(lay) and find_value_cmp(lay.get(field, 0), limit, sign, units)
        return _Filter(key, negate, test, True)
    if key == "ost":
        try:
            wanted = set(parse_ost_list(value))
        except ValueError:
            raise FindUsage(f"bad OST index '{value}'") from None

        def on_ost(p, st, info):
            lay = info().get("layout") if stat.S_ISREG(st.st_mode) else None
            return bool(lay) and not lay.get("released") and any(
                o["ost"] in wanted for o in layout_objects(lay))
        return _Filter(key, negate, on_ost, True)
    if key == "layout":
        kinds = set(value.split(","))
        if not kinds <= set(_LAYOUTS):
            raise FindUsage(f"bad layout '{value}'")

        def has_layout(p, st, info):
            lay = info().get("layout") if stat.S_ISREG(st.st_mode) else None
            if not lay:
                return False
            # a released RAID0 file is both "released" and "raid0", as in Lustre
            found = {layout_pattern(lay), lay.get("pattern") or "raid0"}
            return bool(kinds & found)
        return _Filter(key, negate, has_layout, True)
    raise FindUsage(f"unknown filter '{key}'")


def parse_find_args(argv: list[str], now: float | None = None):
    """-> (paths, filters, maxdepth, print0); FindUsage on bad input."""
    now = time.time() if now is None else now
    paths: list[str] = []
    filters: list[_Filter] = []
    maxdepth, print0, negate = -1, False, False
    args = iter(argv)
    for arg in args:
        if arg == "!":
            negate = True
            continue
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2 and \
                "-" + arg.partition("=")[0] in {**_FIND_VALUE_OPTS, **_FIND_FLAGS}:
            arg = "-" + arg  # getopt_long_only, as Lustre: -type f is --type f
        if arg.startswith("--"):
            name, eq, inline = arg.partition("=")
        elif arg[:2] in _FIND_VALUE_OPTS and len(arg) > 2:  # getopt's "-nNAME"
            name, eq, inline = arg[:2], "=", arg[2:]
        else:
            name, eq, inline = arg, "", ""
        if name in _FIND_FLAGS:
            print0 = print0 or _FIND_FLAGS[name] == "print0"
        elif name in _FIND_VALUE_OPTS:
            key = _FIND_VALUE_OPTS[name]
            value = inline if eq else next(args, None)
            if value is None:
                raise FindUsage(f"option '{name}' requires an argument")
            if key == "maxdepth":
                if not value.isdigit():
                    raise FindUsage(f"bad maxdepth '{value}'")
                maxdepth = int(value)
            else:
                filters.append(_make_filter(key, value, negate, now))
        elif arg.startswith("-") and arg != "-":
            raise FindUsage(f"unrecognized option '{arg}'")
        else:
            if negate:
                raise FindUsage("'!' must come before an option")
            paths.append(arg)
        negate = False
    if negate:
        raise FindUsage("'!' must come before an option")
    if not paths:
        raise FindUsage("no filename|pathname")
    return paths, filters, maxdepth, print0


def _find(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        _out(f"lfs find: {_FIND_SUMMARY}\n"
             f"usage: {_FIND_USAGE}\n"
             "\t !: used before an option indicates 'NOT' requested attribute\n"
             "\t -: used before a value indicates less than requested value\n"
             "\t +: used before a value indicates more than requested value\n")
        return 0
    try:
        paths, filters, maxdepth, print0 = parse_find_args(argv)
    except FindUsage as e:
        print(f"usage: {_FIND_USAGE}\nlfs find: error: {e}", file=sys.stderr)
        return 2
    end = "\0" if print0 else "\n"
    needs_info = any(f.needs_info for f in filters)
    rc = 0

    def matches(path: str, st: os.stat_result) -> bool:
        cache: dict = {}

        def info() -> dict:
            if "info" not in cache:
                cache["info"] = _info(path, follow=False)
            return cache["info"]
        return all(f.test(path, st, info) != f.negate for f in filters)

    def walk(path: str, st: os.stat_result, level: int) -> None:
        nonlocal rc
        try:
            if matches(path, st):
                _out(path + end)
        except OSError as e:
            _error("find", f"cannot get layout for '{path}': {_strerror(e)}")
            rc = 1
        if not stat.S_ISDIR(st.st_mode) or (0 <= maxdepth <= level):
            return
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            _error("find", f"cannot open '{path}': {_strerror(e)}")
            rc = 1
            return
        base = path.rstrip("/") or "/"
        for entry in entries:
            child = base + entry.name if base == "/" else f"{base}/{entry.name}"
            try:
                child_st = entry.stat(follow_symlinks=False)
            except OSError as e:
                _error("find", f"cannot stat '{child}': {_strerror(e)}")
                rc = 1
                continue
            walk(child, child_st, level + 1)

    for path in paths:
        try:
            st = os.lstat(path)
            if needs_info:
                _lustre_path(path, follow=False)
        except NotLustre:
            _error("find", f"'{path}' is not on a Lustre filesystem: "
                           f"{os.strerror(errno.ENOTTY)}")
            rc = 1
            continue
        except OSError as e:
            _error("find", f"failed for '{path}': {_strerror(e)}")
            rc = 1
            continue
        walk(path, st, 0)
    return rc


# --- help and dispatch -------------------------------------------------------

_FIND_SUMMARY = "Find files matching attributes, recursively."


def _overview() -> str:
    rows = [(n, c.summary) for n, c in COMMANDS.items()]
    rows += [("find", _FIND_SUMMARY), ("help", "Show help for a command.")]
    width = max(len(n) for n, _ in rows)
    body = "\n".join(f"  {n:<{width}}  {s}" for n, s in sorted(rows))
    return ("usage: lfs COMMAND [OPTIONS] [ARGS]   (lfs hsm state FILE also works)\n\n"
            f"Lustre's lfs for lustrefuse mounts. Commands:\n{body}\n\n"
            "'lfs help COMMAND' or 'lfs COMMAND --help' describes a command.\n")


def _help(argv: list[str]) -> int:
    if not argv:
        _out(_overview())
        return 0
    name = _command_name(argv)[0]
    if name in COMMANDS:
        COMMANDS[name].parser().print_help()
        return 0
    if name == "find":
        return _find(["--help"])
    _error("help", f"unknown command '{name}'")
    return 2


def _command_name(argv: list[str]) -> tuple[str, list[str]]:
    """``hsm state FILE`` (Lustre 2.17 spelling) -> ``hsm_state FILE``."""
    if argv[0] == "hsm" and len(argv) > 1 and f"hsm_{argv[1]}" in COMMANDS:
        return f"hsm_{argv[1]}", argv[2:]
    return argv[0], argv[1:]


def _dispatch(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(_overview())
        return 2
    if argv[0] in ("-h", "--help"):
        _out(_overview())
        return 0
    if argv[0] == "--list-commands":
        _out("".join(f"{n}\n" for n in sorted([*COMMANDS, "find", "help"])))
        return 0
    name, rest = _command_name(argv)
    if name == "help":
        return _help(rest)
    if name == "find":
        return _find(rest)
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"lfs: unknown command '{name}' (try 'lfs help')", file=sys.stderr)
        return 2
    parser = cmd.parser()
    try:
        return cmd.run(parser, parser.parse_intermixed_args(rest))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def main(argv: list[str] | None = None) -> int:
    """The ``lfs`` console script: returns the exit status."""
    try:
        rc = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
        return rc
    except BrokenPipeError:  # the reader left ("lfs find ... | head"): stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
