"""``mount -t fuse.lustrefuse SOURCE MOUNTPOINT -o OPTIONS`` and ``/etc/fstab`` lines.

mount.fuse3 runs ``lustrefuse SOURCE MOUNTPOINT -o OPTIONS`` and expects it to
return once the filesystem is mounted. SOURCE is a data directory (its MDS
listens on DATA_DIR/mds.sock) or an MDS address (``unix:PATH``, ``tcp:HOST:PORT``).
Options of ours: ``secret_file=PATH``, ``attr_timeout=SECONDS``, ``log_file=PATH``;
FUSE options (``allow_other``, ``ro``, ...) pass through; mount(8)'s own
(``rw``, ``_netdev``, ``noauto``, ``x-systemd.*``, ...) are dropped.

    /var/lib/lustrefuse/demo  /mnt/demo  fuse.lustrefuse  _netdev,allow_other  0 0
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

OURS = {"secret_file", "attr_timeout", "log_file", "log_level"}
DROPPED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
           "dev", "suid", "exec", "async", "sync", "relatime", "strictatime"}
FUSE_PASS = {"allow_other", "allow_root", "ro", "noatime", "nodev", "nosuid", "noexec",
             "default_permissions", "auto_unmount"}


def looks_like_fstab_call(argv: list[str]) -> bool:
    """``lustrefuse SOURCE MOUNTPOINT ...`` as mount.fuse3 runs it (no subcommand)."""
    return len(argv) >= 3 and argv[1].startswith(("unix:", "tcp:", "/"))


def parse(argv: list[str]) -> tuple[str, str, dict, list[str]]:
    """argv (without the program) -> (MDS address, mountpoint, our options, FUSE options)."""
    if len(argv) < 2:
        raise ValueError("usage: lustrefuse SOURCE MOUNTPOINT [-o OPTIONS]")
    source, mountpoint, rest = argv[0], argv[1], argv[2:]
    opts: list[str] = []
    while rest:
        a = rest.pop(0)
        if a == "-o" and rest:
            opts += rest.pop(0).split(",")
        elif a.startswith("-o"):
            opts += a[2:].split(",")
        else:
            raise ValueError(f"unexpected argument '{a}'")
    ours, fuse = {}, []
    for o in filter(None, opts):
        key, _, value = o.partition("=")
        if key in OURS:
            ours[key] = value
        elif key in DROPPED or key.startswith(("x-systemd.", "x-", "comment=")):
            continue
        elif key in FUSE_PASS:
            fuse.append(o)
        else:
            raise ValueError(f"unknown mount option '{o}'")
    if source.startswith(("unix:", "tcp:")):
        address = source
    else:
        if not os.path.isfile(os.path.join(source, "fs.json")):
            raise ValueError(f"{source} holds no lustrefuse filesystem")
        address = f"unix:{os.path.join(os.path.abspath(source), 'mds.sock')}"
    return address, os.path.abspath(mountpoint), ours, fuse


def main(argv: list[str]) -> int:
    from .services import is_mounted

    try:
        address, mountpoint, ours, fuse = parse(argv)
    except ValueError as e:
        print(f"lustrefuse: {e}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "lustrefuse", "mount", address, mountpoint]
    source = argv[0]
    if not source.startswith(("unix:", "tcp:")):
        cmd += ["--data-dir", os.path.abspath(source)]
    for key in ("secret_file", "attr_timeout", "log_file", "log_level"):
        if ours.get(key):
            cmd += ["--" + key.replace("_", "-"), ours[key]]
    for o in fuse:
        cmd += ["-o", o]
    log = ours.get("log_file")
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if is_mounted(mountpoint):
            return 0
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            print(f"lustrefuse: mount failed: {err[-1] if err else proc.returncode}",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)
    proc.kill()
    print("lustrefuse: the mount did not come up within 30s", file=sys.stderr)
    return 1
