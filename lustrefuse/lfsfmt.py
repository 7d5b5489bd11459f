"""The exact text Lustre's ``lfs`` prints, as pure functions (no I/O).

Formats follow Lustre 2.15, the client FSx runs (reference §1.2-1.4, §2.4,
§2.5): ``lfs.c`` for hsm_state/hsm_action/df and liblustreapi's
``lov_dump_user_lmm_header``/``lov_dump_user_lmm_v1v3`` for getstripe. Where C
and Python formatting differ (``%#x`` of 0, u64 wrap-around) the C result is
reproduced. Functions that print one line return it without the newline;
multi-line blocks return their full text, trailing blank lines included.
"""

from __future__ import annotations

import enum

from . import hsm

U64 = (1 << 64) - 1
LUSTRE_EOF = U64  # hsm_extent length -1: "to the end of the file"

LOV_MAGIC_V1 = 0x0BD10BD0
FID_SEQ_IDIF = 0x100000000  # OST object FIDs of MDT0 objects (ostid_to_fid)
FID_SEQ_RSVD = 11  # groups up to this print in decimal in the object table


def _c_hex(value: int) -> str:
    """C's ``%#llx``: no ``0x`` prefix for zero."""
    return f"{value:#x}" if value else "0"


def _dfid(seq: int, oid: int, ver: int, brace: bool = True) -> str:
    """Lustre's DFID (``[%#llx:0x%x:0x%x]``) or DFID_NOBRACE."""
    text = f"{_c_hex(seq)}:{oid:#x}:{ver:#x}"
    return f"[{text}]" if brace else text


def _fid_parts(fid: str) -> tuple[int, int, int]:
    seq, oid, ver = (int(p, 16) for p in fid.strip().strip("[]").split(":"))
    return seq, oid, ver


# --- HSM (lfs.c lfs_hsm_state, lfs_hsm_action) ------------------------------

def hsm_state_line(path: str, flags: int, archive_id: int) -> str:
    """``PATH: (0x0000000d) released exists archived, archive_id:1``."""
    words = "".join(" " + w for w in hsm.state_words(flags))
    tail = f", archive_id:{archive_id}" if archive_id else ""
    return f"{path}: (0x{flags & 0xFFFFFFFF:08x}){words}{tail}"


def _enum_word(enum_cls, value, default: str) -> str:
    """An enum member's name given its name or number (hsm_*2name), else ``default``."""
    try:
        return enum_cls(value).name if isinstance(value, int) else enum_cls[str(value).upper()].name
    except (KeyError, ValueError):
        return default


def hsm_action_line(path: str, action: dict | None) -> str:
    """``f: NOOP``, ``f: RESTORE running (1048576 bytes moved)``,
    ``f: RESTORE waiting (from 0 to EOF)``."""
    action = action or {"action": "NOOP"}
    name = _enum_word(hsm.Action, action.get("action", "NOOP"), "UNKNOWN")
    if name == "NOOP":
        return f"{path}: NOOP"
    state = _enum_word(hsm.Progress, action.get("state", "waiting"), "UNKNOWN").lower()
    offset = action.get("offset", 0) & U64
    length = action.get("length", -1) & U64
    if state == "running" and name in ("ARCHIVE", "RESTORE"):
        where = f"({action.get('bytes', 0)} bytes moved)"
    elif (offset + length) & U64 == LUSTRE_EOF:  # u64 sum, as in C
        where = f"(from {offset} to EOF)"
    else:
        where = f"(from {offset} to {(offset + length) & U64})"
    return f"{path}: {name} {state} {where}"


# --- getstripe (liblustreapi lov_dump_user_lmm_*) ---------------------------

class Show(enum.IntFlag):
    """Which getstripe fields to print (llapi's VERBOSE_* bits)."""

    OBJID = 0x01  # the object table (-q shows only this)
    COUNT = 0x02  # -c
    SIZE = 0x04  # -S
    OFFSET = 0x08  # -i
    PATTERN = 0x10  # -L
    GEN = 0x20  # -g
    FID = 0x40  # -F
    DETAIL = 0x80  # -v: magic, seq, object id and FID too
    DEFAULT = COUNT | SIZE | OFFSET | PATTERN | GEN | OBJID


def _fields(values, show: Show, is_dir: bool, yaml: bool) -> str:
    """The header's field loop: labels only when more than one field is asked
    for; directories (not in YAML) put all fields on one line."""
    out, sep = [], ""
    for bit, label, value in values:
        if not show & bit:
            continue
        out.append(sep)
        if show & ~bit:
            out.append(label)
        out.append(str(value))
        sep = " " if is_dir and not yaml else "\n"
    if sep:
        out.append("\n")
    return "".join(out)


def layout_objects(layout: dict) -> list[dict]:
    objs = layout.get("objects")
    if objs is None:  # no object ids given: show the OSTs alone
        objs = [{"ost": o, "objid": 0, "group": 0} for o in layout.get("osts", [])]
    return objs


def _ost_fid(obj: dict) -> str:
    """ostid_to_fid: objects in group 0 get an IDIF FID naming their OST."""
    objid, group = obj["objid"], obj.get("group", 0)
    if group == 0:
        seq = FID_SEQ_IDIF | (obj["ost"] << 16) | ((objid >> 32) & 0xFFFF)
        return _dfid(seq, objid & 0xFFFFFFFF, 0, brace=False)
    return _dfid(group, objid & 0xFFFFFFFF, 0, brace=False)


def _object_row(obj: dict, mark: str) -> str:
    group = obj.get("group", 0)
    group_text = f"{group:14d}" if group <= FID_SEQ_RSVD else f"{_c_hex(group):>14}"
    objid = obj["objid"]
    return f"\t{obj['ost']:6d}\t{objid:14d}\t{_c_hex(objid):>13}\t{group_text}{mark}\n"


def layout_pattern(layout: dict) -> str:
    """layout2name (2.11-2.16): any released layout reads ``released``."""
    return "released" if layout.get("released") else layout.get("pattern") or "raid0"


def _stripe_offset(layout: dict) -> int:
    objs = layout_objects(layout)
    if objs and not layout.get("released"):
        return objs[0]["ost"]
    if layout.get("pattern") == "mdt":
        return 0
    offset = layout.get("stripe_offset", -1)
    return offset if offset >= 0 else (layout.get("osts") or [0])[0]


def getstripe_file(path: str, fid: str, layout: dict, show: Show = Show.DEFAULT, *,
                   print_path: bool = True, yaml: bool = False, ost: int | None = None) -> str:
    """``lfs getstripe FILE`` for a plain (non-composite) layout.

    ``print_path`` is false for single-field options (-c -S -i -L -g -F),
    ``ost`` is -O: only files with a stripe there, only that row, marked ``*``.
    """
    objects = layout_objects(layout)
    if ost is not None and all(o["ost"] != ost for o in objects):
        return ""
    out = []
    if print_path and not yaml:
        out.append(path + "\n")
    seq, oid, ver = _fid_parts(fid)
    if show & Show.DETAIL:
        out.append(f"lmm_magic:         0x{LOV_MAGIC_V1:08X}\n")
        out.append(f"lmm_seq:           {_c_hex(seq)}\n")
        out.append(f"lmm_object_id:     {_c_hex(oid)}\n")
    if show & (Show.DETAIL | Show.FID):
        label = "lmm_fid:           " if show & ~Show.FID else ""
        out.append(label + _dfid(seq, oid, ver, brace=not yaml) + "\n")
    pattern = layout_pattern(layout)
    out.append(_fields([
        (Show.COUNT, "lmm_stripe_count:  ", layout.get("stripe_count", len(objects))),
        (Show.SIZE, "lmm_stripe_size:   ", layout["stripe_size"]),
        (Show.PATTERN, "lmm_pattern:       ", pattern),
        (Show.GEN, "lmm_layout_gen:    ", layout.get("gen", 0)),
        (Show.OFFSET, "lmm_stripe_offset: ", _stripe_offset(layout)),
    ], show, False, yaml))
    # released and DoM layouts have no OST objects to list
    if show & Show.OBJID and pattern not in ("released", "mdt"):
        if yaml:
            out.append("lmm_objects:\n")
        else:
            out.append("\tobdidx\t\t objid\t\t objid\t\t group\n")
        for obj in objects:
            if ost is not None and obj["ost"] != ost:
                continue
            if yaml:
                out.append(f"      - l_ost_idx: {obj['ost']}\n")
                out.append(f"        l_fid:     {_ost_fid(obj)}\n")
            else:
                out.append(_object_row(obj, " *" if obj["ost"] == ost else ""))
    out.append("\n")
    return "".join(out)


def _is_unset(default: dict | None) -> bool:
    return not default or (not default.get("stripe_size") and not default.get("stripe_count")
                           and default.get("stripe_offset", -1) == -1
                           and not default.get("ost_list"))


def getstripe_dir(path: str, default: dict | None, fs_default: dict,
                  show: Show = Show.DEFAULT, *, print_path: bool = True, yaml: bool = False,
                  raw: bool = False) -> str:
    """``lfs getstripe -d DIR``: the directory's default layout on one line.

    A directory without a default shows the filesystem defaults with pattern
    ``0`` (no layout stored, so no pattern); ``raw`` shows ``0 0 -1`` instead.
    """
    unset = _is_unset(default)
    d = {} if unset else default
    count = d.get("stripe_count", 0)
    size = d.get("stripe_size", 0)
    if not raw:
        count = count or fs_default.get("stripe_count", 1)
        size = size or fs_default.get("stripe_size", 0)
    out = []
    if unset and not raw and show & Show.DETAIL:
        out.append("(Default) ")
    if print_path and not yaml and show != Show.OBJID:
        out.append(path + "\n")
    out.append(_fields([
        (Show.COUNT, "stripe_count:  ", count),
        (Show.SIZE, "stripe_size:   ", size),
        (Show.PATTERN, "pattern:       ", "0" if unset else d.get("pattern", "raid0")),
        (Show.OFFSET, "stripe_offset: ", d.get("stripe_offset", -1)),
    ], show, True, yaml))
    out.append("\n")
    return "".join(out)


def no_stripe_info(path: str) -> str:
    """What getstripe prints for an entry without a layout (symlinks, devices)."""
    return f"{path} has no stripe info\n"


# --- df (lfs.c showdf/mntdf, 2.15 layout) -----------------------------------

_UUF, _CSF, _RSF = "{:<20}", "{:>11}", "{:>4}"
_ROW = _UUF + " " + _CSF + " " + _CSF + " " + _CSF + " " + _RSF + " {}"


def _ratio(used: int, avail: int) -> int:
    """obd_statfs_ratio: percentage used, rounded up like df(1)."""
    ratio = used / (used + avail) * 100 if used + avail > 0 else 0.0
    return int(ratio) + 1 if ratio - int(ratio) > 0 else int(ratio)


def _cook(value: int, decimal: bool) -> str:
    """-h/-H: ``%8.1f`` plus a unit suffix once the value exceeds one unit."""
    base = 1000 if decimal else 1024
    suffix = "kMGTPEZY" if decimal else "KMGTPEZY"
    cooked, radix = float(value), 0
    while cooked > base:
        cooked /= base
        radix += 1
    return f"{cooked:8.1f}{suffix[radix - 1]}" if radix else f"{value:11d}"


def _df_row(uuid: str, st: dict, mount: str, cooked: bool, decimal: bool, inodes: bool) -> str:
    if inodes:
        total, free = st["files"], st["ffree"]
        used, avail = total - free, free
        shown = (total, used, avail)
    else:
        used, avail = st["blocks"] - st["bfree"], st["bavail"]
        shift = 0 if cooked else 10  # bytes with -h/-H, else KiB
        shown = (st["blocks"] >> shift, used >> shift, avail >> shift)
    cells = [_cook(v, decimal) if cooked else f"{v:11d}" for v in shown]
    return _ROW.format(uuid, *cells, f"{_ratio(used, avail):3d}%", mount)


def df_text(df: dict, mount: str | None = None, *, cooked: bool = False,
            decimal: bool = False, inodes: bool = False) -> str:
    """``lfs df [-h|-H] [-i]`` for one filesystem.

    ``df`` holds byte counts per target (blocks, bfree, bavail, files, ffree).
    The summary's space is the OSTs' alone; its inodes are the MDTs', cut down
    to the OSTs' free objects when those are fewer.
    """
    mount = mount or df["mount"]
    fsname = df.get("fsname", "lustrefuse")
    decimal = decimal and cooked
    if inodes:
        header = ("UUID", "Inodes", "IUsed", "IFree", "IUse%", "Mounted on")
    else:
        header = ("UUID", "bytes" if cooked else "1K-blocks", "Used", "Available", "Use%",
                  "Mounted on")
    lines = [_ROW.format(*header)]
    keys = ("blocks", "bfree", "bavail", "files", "ffree")
    total = dict.fromkeys(keys, 0)
    ost_files = ost_ffree = 0
    for kind, targets in (("MDT", df.get("mdts", [])), ("OST", df.get("osts", []))):
        if kind == "OST" and targets:  # OST space replaces MDT space in the summary
            total.update(blocks=0, bfree=0, bavail=0)
        for st in targets:
            uuid = f"{fsname}-{kind}{st['index']:04x}_UUID"
            row = _df_row(uuid, st, mount, cooked, decimal, inodes)
            lines.append(f"{row}[{kind}:{st['index']}]")
            for k in ("blocks", "bfree", "bavail"):
                total[k] += st[k]
            if kind == "MDT":
                total["files"] += st["files"]
                total["ffree"] += st["ffree"]
            else:
                ost_files += st["files"]
                ost_ffree += st["ffree"]
    if ost_files and ost_ffree < total["ffree"]:
        total["files"] = total["files"] - total["ffree"] + ost_ffree
        total["ffree"] = ost_ffree
    lines.append("")
    lines.append(_df_row("filesystem_summary:", total, mount, cooked, decimal, inodes))
    lines.append("")
    return "\n".join(lines) + "\n"
