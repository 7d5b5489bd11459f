"""``lustrefuse``: bring a filesystem up and down, run its parts, look inside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import click

from . import services
from .layout import DEFAULT_IMPORTED_CHUNK_SIZE, DEFAULT_STRIPE_SIZE, parse_size

CTL = ".lustrefuse_ctl"
READY_LINE = "LUSTREFUSE-READY"


def fail(message: str, code: int = 1):
    click.echo(f"lustrefuse: {message}", err=True)
    sys.exit(code)


def size_option(value):
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def read_secret(path: str | None, listen: str | None = None) -> bytes | None:
    if not path:
        if listen and listen.startswith("tcp:"):
            fail("a TCP listener needs --secret-file (clients must prove they know it)", 2)
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        fail(f"cannot read the secret file: {e.strerror}")
    if len(secret) < 16:
        fail("the shared secret must be at least 16 bytes")
    return secret


def default_data_dir(bucket: str) -> str:
    base = "/var/lib/lustrefuse" if os.geteuid() == 0 else os.path.expanduser(
        "~/.local/share/lustrefuse")
    return os.path.join(base, bucket)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lustrefuse")
def main():
    """A Lustre-like striped filesystem over an S3 bucket, served through FUSE.

    Start with `lustrefuse up s3://BUCKET MOUNTPOINT`, then use the mount with
    ordinary tools and `lfs` (hsm_state, hsm_restore, hsm_release, getstripe, df...).
    """


# -- up / down ----------------------------------------------------------------

def _new_config(source, endpoint_url, osts, stripe_size, chunk_size, fsname) -> dict:
    """A filesystem's fixed settings from `up`/`mkfs` arguments (exit 2 on bad ones)."""
    from . import keys

    try:
        bucket, prefix = keys.parse_s3_url(source)
    except ValueError as e:
        fail(str(e), 2)
    if stripe_size % (64 * 1024):
        fail("--stripe-size must be a multiple of 64K", 2)
    if not (fsname.isalnum() and fsname.isascii() and 0 < len(fsname) <= 10):
        fail("--fsname takes 1 to 10 letters or digits", 2)
    return {"bucket": bucket, "prefix": prefix, "endpoint_url": endpoint_url, "osts": osts,
            "stripe_size": stripe_size, "imported_file_chunk_size": chunk_size,
            "fsname": fsname}


def _check_mountpoint(mp: str):
    if not os.path.exists(mp):
        fail(f"mountpoint {mp} does not exist")
    if not os.path.isdir(mp):
        fail(f"mountpoint {mp} is not a directory")
    if services.is_mounted(mp):
        fail(f"{mp} is already a mount point")
    if os.listdir(mp):
        fail(f"mountpoint {mp} is not empty")


def _progress_printer():
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(st: dict):
        now = time.monotonic()
        done = st["state"] != "running"
        if not done and now - last[0] < (0.2 if tty else 2.0):
            return
        last[0] = now
        rate = st["listed"] / st["elapsed"] if st.get("elapsed") else 0
        line = (f"importing: {st['listed']} objects listed, {st['new']} new, "
                f"{st['changed']} changed, {st['deleted']} deleted, {st['skipped']} skipped "
                f"({rate:,.0f}/s)")
        click.echo(("\r" + line) if tty else line, err=True, nl=not tty or done)
    return show


@main.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path())
@click.option("--endpoint-url", help="S3 endpoint (default: boto3's usual sources).")
@click.option("--data-dir", type=click.Path(), help="Where the MDS database and OST "
              "directories live (default: /var/lib/lustrefuse/BUCKET as root).")
@click.option("--osts", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Number of OST worker processes (first run only).")
@click.option("--stripe-size", default=str(DEFAULT_STRIPE_SIZE), callback=lambda c, p, v:
              size_option(v), help="Default stripe size (multiple of 64K).  [default: 1M]")
@click.option("--imported-file-chunk-size", default=str(DEFAULT_IMPORTED_CHUNK_SIZE),
              callback=lambda c, p, v: size_option(v),
              help="Imported files get size/CHUNK+1 stripes, as FSx.  [default: 1G]")
@click.option("--fsname", default="lustrefuse", show_default=True, help="Filesystem name in "
              "lfs df and fid2path (first run only; 1-8 letters or digits, as Lustre).")
@click.option("--no-posix-metadata", is_flag=True,
              help="Skip the HEAD per object that reads FSx POSIX metadata headers.")
@click.option("--no-import", is_flag=True, help="Do not sweep the bucket on this start.")
@click.option("--auto-export", metavar="EVENTS", help="Export to S3 on new,changed,deleted "
              "(FSx auto-export policy; 'none' turns it off).")
@click.option("--auto-import", metavar="EVENTS", help="Sweep S3 periodically for "
              "new,changed,deleted objects (FSx auto-import policy).")
@click.option("--auto-import-interval", type=click.FloatRange(1), metavar="SECONDS",
              help="Seconds between auto-import sweeps.  [default: 60]")
@click.option("--ost-capacity", default=None, callback=lambda c, p, v: size_option(v) if v else None,
              help="Bytes each OST may hold (default: its whole disk).")
@click.option("--hydrate-budget", default=None, callback=lambda c, p, v: size_option(v) if v else None,
              help="Bytes of S3 GETs each OST keeps in flight at most (demand reads, "
              "prefetch and restores share it; bounds OST memory).  [default: 64M]")
@click.option("--low-watermark", type=click.FloatRange(0, 1), default=None,
              help="Auto-release LRU files when an OST's free fraction falls under this.")
@click.option("--high-watermark", type=click.FloatRange(0, 1), default=None,
              help="...until its free fraction is back over this.")
@click.option("--foreground", is_flag=True, help="Stay attached (for systemd and debugging).")
@click.option("--attr-timeout", type=float, default=10.0, show_default=True,
              help="Seconds the kernel may cache names and attributes.")
@click.option("-o", "options", multiple=True, help="Extra FUSE mount option.")
@click.option("--metrics-port", type=click.IntRange(1, 65000), help="Prometheus metrics on "
              "127.0.0.1: MDS at PORT, mount at PORT+1, OST i at PORT+2+i (opt-in).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def up(source, mountpoint, endpoint_url, data_dir, osts, stripe_size, imported_file_chunk_size,
       fsname, no_posix_metadata, no_import, auto_export, auto_import, auto_import_interval, ost_capacity,
       hydrate_budget, low_watermark, high_watermark, foreground, attr_timeout, options, metrics_port,
       log_level):
    """Create or reopen a filesystem over S3 and mount it.

    SOURCE is s3://BUCKET[/PREFIX]. The first run creates DATA_DIR (MDS database,
    one directory per OST) and imports the bucket listing as metadata-only stubs;
    later runs keep hydrated data and HSM state and import what changed.
    """
    from .mds import check_repository, load_or_init_config
    from .repository import parse_policy

    config = _new_config(source, endpoint_url, osts, stripe_size, imported_file_chunk_size,
                         fsname)

    for flag, value in (("--auto-export", auto_export), ("--auto-import", auto_import)):
        try:
            parse_policy(value)
        except ValueError as e:
            fail(f"{flag}: {e}", 2)
    mountpoint = os.path.abspath(mountpoint)
    data_dir = os.path.abspath(data_dir or default_data_dir(config["bucket"]))
    state = services.supervisor_alive(data_dir)
    if state and state.get("mountpoint") == mountpoint and services.is_mounted(mountpoint):
        os.kill(state["supervisor"], signal.SIGHUP)  # restart parts that died
        time.sleep(1.0)
        click.echo(f"lustrefuse: {source} is already up on {mountpoint}; restarted any "
                   "stopped services")
        return
    if state:
        fail(f"{data_dir} is in use by lustrefuse (pid {state['supervisor']}) on "
             f"{state.get('mountpoint')}")
    _clean_stale(data_dir, mountpoint)
    _check_mountpoint(mountpoint)
    config.update({"auto_export": auto_export, "auto_import": auto_import,
                   "auto_import_interval": auto_import_interval, "capacity": ost_capacity,
                   "hydrate_budget": hydrate_budget,
                   "low_watermark": low_watermark, "high_watermark": high_watermark})
    check_repository(config)
    config = load_or_init_config(data_dir, config)
    args = {"posix_metadata": not no_posix_metadata, "import": not no_import,
            "attr_timeout": attr_timeout, "options": list(options), "log_level": log_level,
            "metrics_port": metrics_port}
    if foreground or os.environ.get("LUSTREFUSE_SUPERVISOR"):
        _run_supervisor(data_dir, mountpoint, config, args, source)
        return
    _launch_background(data_dir, mountpoint, source)


def _clean_stale(data_dir: str, mountpoint: str):
    """A previous run that died: stop what it left and clear a dead mount."""
    path = os.path.join(data_dir, "up.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                pids = json.load(f).get("pids", {})
        except ValueError:
            pids = {}
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.unlink(path)
    if services.is_mounted(mountpoint) and services.mount_data_dir(mountpoint) == data_dir:
        services.unmount(mountpoint, lazy=True)


def _run_supervisor(data_dir, mountpoint, config, args, source):
    services.setup_logging(args["log_level"], os.path.join(data_dir, "log", "up.log")
                           if os.path.isdir(os.path.join(data_dir, "log")) else None)
    sup = services.Supervisor(data_dir, mountpoint, config, args)
    try:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        sup.bring_up(_progress_printer())
    except (SystemExit, KeyboardInterrupt, Exception) as e:
        sup.teardown()
        msg = str(e) if not isinstance(e, KeyboardInterrupt) else "interrupted"
        fail(msg or "failed to start")
    services.sd_notify()
    click.echo(READY_LINE)
    click.echo(f"lustrefuse: {source} is mounted on {mountpoint} "
               f"({config['osts']} OSTs, data in {data_dir}).")
    click.echo(f"  try: ls {mountpoint}; lfs hsm_state {mountpoint}/FILE; "
               f"lustrefuse stats {mountpoint}")
    click.echo(f"  stop: lustrefuse down {mountpoint}")
    sys.stdout.flush()
    if not os.environ.get("LUSTREFUSE_SUPERVISOR"):
        sup.watch()
        return
    # background mode: detach from the launcher's pipe, then watch
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sup.watch()


def _launch_background(data_dir, mountpoint, source):
    env = dict(os.environ, LUSTREFUSE_SUPERVISOR="1")
    os.makedirs(os.path.join(data_dir, "log"), exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "lustrefuse", "up", *sys.argv[2:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    import threading

    def relay_err():
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()

    t = threading.Thread(target=relay_err, daemon=True)
    t.start()
    ready = False
    for line in proc.stdout:
        if line.strip() == READY_LINE:
            ready = True
            continue
        sys.stdout.write(line)
        if ready and line.startswith("  stop:"):
            break
    if not ready:
        proc.wait()
        t.join(timeout=2)
        sys.exit(proc.returncode or 1)


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--force", is_flag=True, help="Detach a busy mount lazily.")
@click.option("--data-dir", type=click.Path(), help="If the mount is already gone.")
def down(mountpoint, force, data_dir):
    """Unmount and stop every process of a filesystem (or clean up a stale mount)."""
    mp = os.path.abspath(mountpoint)
    dd = services.mount_data_dir(mp) or (os.path.abspath(data_dir) if data_dir else None)
    if dd is None:
        fail(f"{mp} is not a lustrefuse mount (give --data-dir to stop a filesystem whose "
             "mount is gone)")
    state = services.supervisor_alive(dd)
    if services.is_mounted(mp):
        r = services.unmount(mp)
        if r.returncode != 0:
            if not force:
                fail(f"cannot unmount {mp}: {r.stderr.strip() or 'busy'} (use --force)")
            services.unmount(mp, lazy=True)
    if state:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(state["supervisor"], 0)
            except OSError:
                break
            time.sleep(0.05)
        else:
            os.kill(state["supervisor"], signal.SIGTERM)
    _clean_stale(dd, mp)
    click.echo(f"lustrefuse: {mp} is down")


# -- the parts ----------------------------------------------------------------

@main.command()
@click.argument("source")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--endpoint-url", help="S3 endpoint (default: boto3's usual sources).")
@click.option("--osts", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--stripe-size", default=str(DEFAULT_STRIPE_SIZE),
              callback=lambda c, p, v: size_option(v), help="Default stripe size.  [default: 1M]")
@click.option("--imported-file-chunk-size", default=str(DEFAULT_IMPORTED_CHUNK_SIZE),
              callback=lambda c, p, v: size_option(v), help="[default: 1G]")
@click.option("--fsname", default="lustrefuse", show_default=True)
def mkfs(source, data_dir, endpoint_url, osts, stripe_size, imported_file_chunk_size, fsname):
    """Create a filesystem's DATA_DIR for SOURCE (s3://BUCKET[/PREFIX]) without starting it,
    for hosts that run `mds`, `ost` and `mount` as services (systemd). Import with
    `lustrefuse task import` once the services run."""
    from .mds import check_repository, load_or_init_config

    config = _new_config(source, endpoint_url, osts, stripe_size, imported_file_chunk_size,
                         fsname)
    if os.path.exists(os.path.join(data_dir, "fs.json")):
        fail(f"{data_dir} already holds a filesystem")
    check_repository(config)
    load_or_init_config(os.path.abspath(data_dir), config)
    click.echo(f"lustrefuse: created {data_dir} for {source} ({osts} OSTs)")


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False))
@click.option("--listen", help="unix:PATH or tcp:HOST:PORT (default unix:DATA_DIR/mds.sock)")
@click.option("--secret-file", type=click.Path(), help="Shared secret for TCP listeners.")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here (opt-in).")
@click.option("--log-level", default="info")
@click.option("--log-file", type=click.Path())
def mds(data_dir, listen, secret_file, metrics, log_level, log_file):
    """Run the metadata server for DATA_DIR (created by `up` or `mkfs`)."""
    services.setup_logging(log_level, log_file)
    if not os.path.exists(os.path.join(data_dir, "fs.json")):
        fail(f"{data_dir} holds no lustrefuse filesystem (fs.json missing)")
    services.run_mds(data_dir, listen, read_secret(secret_file, listen), metrics)


@main.command()
@click.option("--index", required=True, type=click.IntRange(0, 1023))
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@click.option("--mds", "mds_address", required=True, help="The MDS address.")
@click.option("--listen", help="unix:PATH or tcp:HOST:PORT (default unix:DIR/ost.sock)")
@click.option("--secret-file", type=click.Path())
@click.option("--endpoint-url", help="Override the S3 endpoint the MDS announces.")
@click.option("--capacity", default="0", callback=lambda c, p, v: size_option(v),
              help="Bytes this OST may hold (0: the whole disk).")
@click.option("--hydrate-budget", default="64M", show_default=True,
              callback=lambda c, p, v: size_option(v),
              help="Bytes of S3 GETs in flight at most (demand reads, prefetch and restores "
              "share it; bounds this process's memory).")
@click.option("--low-watermark", type=click.FloatRange(0, 1), default=0.0,
              help="Auto-release starts when free space falls under this fraction.")
@click.option("--high-watermark", type=click.FloatRange(0, 1), default=0.0,
              help="Auto-release stops when free space is back over this fraction.")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here (opt-in).")
@click.option("--log-level", default="info")
@click.option("--log-file", type=click.Path())
def ost(index, directory, mds_address, listen, secret_file, endpoint_url, capacity,
        hydrate_budget, low_watermark, high_watermark, metrics, log_level, log_file):
    """Run one object storage target over DIR."""
    services.setup_logging(log_level, log_file)
    if high_watermark and high_watermark < low_watermark:
        fail("--high-watermark must be at least --low-watermark", 2)
    services.run_ost(index, directory, mds_address, listen, read_secret(secret_file, listen),
                     endpoint_url, capacity, low_watermark, high_watermark or low_watermark,
                     metrics, hydrate_budget)


@main.command()
@click.argument("mds_address")
@click.argument("mountpoint", type=click.Path())
@click.option("--data-dir", type=click.Path(), help="Shown as the mount's source.")
@click.option("--secret-file", type=click.Path())
@click.option("--attr-timeout", type=float, default=10.0, show_default=True)
@click.option("-o", "options", multiple=True, help="FUSE mount options (comma lists work).")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here (opt-in).")
@click.option("--log-level", default="info")
@click.option("--log-file", type=click.Path())
def mount(mds_address, mountpoint, data_dir, secret_file, attr_timeout, options, metrics,
          log_level, log_file):
    """Run the FUSE client for MDS_ADDRESS on MOUNTPOINT (in the foreground)."""
    services.setup_logging(log_level, log_file)
    opts = [o for group in options for o in group.split(",")]
    services.run_mount(mds_address, mountpoint, read_secret(secret_file), attr_timeout,
                       os.path.abspath(data_dir) if data_dir else None, opts,
                       metrics=metrics)


# -- checking (fsck, scrub) ----------------------------------------------------

@main.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--repair", is_flag=True, help="Fix what can be fixed without losing data.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def fsck(data_dir, repair, as_json):
    """Check the MDS and the OSTs of an offline filesystem against each other.

    Exit 0: clean (or, with --repair, everything found was fixed); 1: problems
    remain; 2: cannot run (e.g. the filesystem is up).
    """
    from . import fsck as fsck_module
    from .scrub import EnvError

    try:
        sys.exit(fsck_module.run(data_dir, repair, as_json, echo=click.echo))
    except EnvError as e:
        fail(str(e), 2)


@main.command()
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option("--ost", type=click.IntRange(0, 1023), help="Only this OST.")
@click.option("--repair", is_flag=True, help="Drop bad chunks of clean archived files so they "
              "are fetched again from S3 (the OSTs holding them must be stopped).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def scrub(target, ost, repair, as_json):
    """Verify every local chunk against its checksum (safe while the filesystem runs).

    TARGET is the data directory or the mount point. Exit 0: all chunks good;
    1: bad chunks (not repaired); 2: cannot run.
    """
    from . import scrub as scrub_module

    try:
        sys.exit(scrub_module.run(target, ost, as_json, repair, echo=click.echo))
    except scrub_module.EnvError as e:
        fail(str(e), 2)


# -- looking inside -----------------------------------------------------------

def _ctl(path: str) -> str:
    p = os.path.abspath(path)
    while True:
        ctl = os.path.join(p, CTL)
        if os.path.exists(ctl):
            return ctl
        if p == "/":
            fail(f"{path} is not in a lustrefuse mount")
        p = os.path.dirname(p)


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(mountpoint, as_json):
    """Counters: S3 requests and bytes, bytes served from OSTs, hydration, checksums."""
    data = json.loads(os.getxattr(_ctl(mountpoint), "lustrefuse.stats"))
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    rows = [("S3 requests", data["total"]["s3_requests"]),
            ("S3 GETs", data["total"]["s3_gets"]),
            ("S3 bytes fetched", data["total"]["s3_bytes_in"]),
            ("bytes served from OSTs", data["total"]["bytes_served_from_osts"])]
    for k, v in sorted(data["client"].items()):
        rows.append((f"client {k}", v))
    for idx, s in data["osts"].items():
        for k in ("chunks_hydrated", "single_flight_joins", "verify_failures", "refetched"):
            if k in s:
                rows.append((f"OST{idx} {k}", s[k]))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value:>14,}")


def _files_under(paths, recursive: bool):
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            if not recursive:
                fail(f"{p} is a directory (use -r)", 2)
            for root, _dirs, files in os.walk(p):
                for name in files:
                    full = os.path.join(root, name)
                    if os.path.isfile(full) and not os.path.islink(full):
                        yield full
        elif os.path.isfile(p):
            yield p
        else:
            fail(f"{p}: no such regular file or directory", 2)


def _info(path: str) -> dict:
    return json.loads(os.getxattr(path, "lustrefuse.info", follow_symlinks=False))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-r", "--recursive", is_flag=True, help="Restore every file under directories.")
@click.option("--wait", is_flag=True, help="Wait until every file is local, with progress.")
def restore(paths, recursive, wait):
    """Bring files back from S3 ahead of use (lfs hsm_restore, batched and watchable)."""
    files = list(_files_under(paths, recursive))
    if not files:
        click.echo("nothing to restore")
        return
    ctl = _ctl(files[0])
    by_ino = {}
    for f in files:
        st = os.stat(f)
        by_ino[st.st_ino] = (f, st.st_size)
    inos = list(by_ino)
    for i in range(0, len(inos), 1000):
        batch = inos[i:i + 1000]
        try:
            os.setxattr(ctl, "lustrefuse.request",
                        json.dumps({"action": "restore", "inos": batch}).encode())
        except OSError as e:
            fail(f"restore of {by_ino[batch[0]][0]} (batch of {len(batch)}) refused: "
                 f"{e.strerror}")
    total = sum(size for _f, size in by_ino.values())
    click.echo(f"restore queued for {len(files)} files ({total:,} bytes)", err=True)
    if not wait:
        return
    start = time.monotonic()
    pending = set(inos)
    with click.progressbar(length=total, label="restoring", show_eta=True, show_percent=True,
                           file=sys.stderr, item_show_func=lambda _: (
                               f"{len(inos) - len(pending)}/{len(inos)} files")) as bar:
        done_bytes = 0
        while pending:
            active = {r["ino"] for r in json.loads(os.getxattr(ctl, "lustrefuse.hsm_list"))
                      if r["state"] in ("WAITING", "STARTED")}
            finished = [i for i in pending if i not in active]
            failed = []
            for i in finished:
                info = _info(by_ino[i][0])
                if info["hsm"]["flags"] & 0x4 and not info["hsm"]["flags"] & 0x40:
                    if info["action"]["action"] == "NOOP" and info["present"] < info["chunks"]:
                        failed.append(i)
                        continue
                pending.discard(i)
                done_bytes += by_ino[i][1]
                bar.update(by_ino[i][1], i)
            if failed and not active:
                for i in failed:
                    click.echo(f"lustrefuse: restore of {by_ino[i][0]} failed (see the OST logs)",
                               err=True)
                sys.exit(1)
            if pending:
                time.sleep(0.2)
    secs = time.monotonic() - start
    click.echo(f"restored {len(files)} files, {total:,} bytes in {secs:.1f}s "
               f"({total / secs / 1e6 if secs else 0:,.0f} MB/s)", err=True)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True)
def status(paths, as_json):
    """How much of a file or tree is local, stripe by stripe, and what is queued."""
    from .hsm import state_words

    rows = []
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            agg = {"path": p, "files": 0, "bytes": 0, "local_bytes": 0, "released": 0,
                   "dirty": 0, "queued": 0, "by_ost": {}}
            for f in _files_under([p], True):
                info = _info(f)
                agg["files"] += 1
                agg["bytes"] += info["size"]
                agg["local_bytes"] += info.get("present_bytes", 0)
                agg["released"] += bool(info["hsm"]["flags"] & 0x4)
                agg["dirty"] += bool(info["hsm"]["flags"] & 0x2)
                agg["queued"] += info["action"]["action"] != "NOOP"
                for o, n in info.get("present_by_ost", {}).items():
                    agg["by_ost"][o] = agg["by_ost"].get(o, 0) + n
            rows.append(agg)
            if not as_json:
                pct = 100 * agg["local_bytes"] / agg["bytes"] if agg["bytes"] else 100
                click.echo(f"{p}: {agg['files']} files, {agg['bytes']:,} bytes, "
                           f"{agg['local_bytes']:,} local ({pct:.1f}%), {agg['released']} "
                           f"released, {agg['dirty']} dirty, {agg['queued']} queued; local "
                           f"stripes by OST: " + ", ".join(
                               f"OST{o}={n}" for o, n in sorted(agg["by_ost"].items())))
            continue
        info = _info(p)
        info["path"] = p
        rows.append(info)
        if as_json:
            continue
        words = " ".join(state_words(info["hsm"]["flags"])) or "new"
        lay = info.get("layout")
        if not lay:
            click.echo(f"{p}: {info['type']}, {words}")
            continue
        pct = 100 * info["present_bytes"] / info["size"] if info["size"] else 100
        act = info["action"]
        queued = act["action"] if act["action"] == "NOOP" else (
            f"{act['action']} {act.get('state', '')}")
        click.echo(f"{p}: {info['size']:,} bytes, {info['present_bytes']:,} local ({pct:.1f}%), "
                   f"{info['present']}/{info['chunks']} stripes; state: {words}; action: {queued}")
        for o in lay["osts"]:
            total = sum(1 for s in range(info["chunks"]) if lay["osts"][s % len(lay["osts"])] == o)
            click.echo(f"  OST{o}: {info['present_by_ost'].get(str(o), 0)}/{total} stripes local")
    if as_json:
        click.echo(json.dumps(rows, indent=1))


def _mds_client(mountpoint: str, mds_address: str | None, secret_file: str | None = None):
    from . import rpc

    if mds_address:
        return rpc.Client(mds_address, read_secret(secret_file, mds_address))
    dd = services.mount_data_dir(mountpoint)
    if dd is None:
        fail(f"{mountpoint} is not a lustrefuse mount (or give --mds ADDRESS)")
    return rpc.Client(f"unix:{os.path.join(dd, 'mds.sock')}")


@main.group()
def task():
    """FSx data-repository tasks: import, export and release, with CSV reports."""


def _print_task(t: dict):
    click.echo(f"task {t['id']} {t['type']} {t['state']}: {t['total']} files, "
               f"{t['succeeded']} succeeded, {t['failed']} failed"
               + (f", {t['released_bytes']:,} bytes released" if t["type"] == "release" else "")
               + (f"; report {t['report']}" if t.get("report") else ""))


def _task_command(kind: str):
    @click.argument("mountpoint", type=click.Path(exists=True))
    @click.argument("paths", nargs=-1)
    @click.option("--older-than", type=float, help="release: only files not used for DAYS.")
    @click.option("--wait/--no-wait", default=True, show_default=True)
    @click.option("--mds", "mds_address", help="MDS address (default: from the mount).")
    @click.option("--secret-file", type=click.Path(), help="Shared secret for a tcp: MDS.")
    def cmd(mountpoint, paths, older_than, wait, mds_address, secret_file):
        mp = os.path.abspath(mountpoint)
        rel = []
        for p in paths:
            full = os.path.abspath(os.path.join(mp, p) if not os.path.isabs(p) else p)
            if not (full + "/").startswith(mp + "/"):
                fail(f"{p} is not under {mp}", 2)
            rel.append(os.path.relpath(full, mp) if full != mp else "")
        c = _mds_client(mp, mds_address, secret_file)
        from .protocol import RpcError

        try:
            t = c.call("task_start", kind=kind, paths=rel, older_than_days=older_than)
        except RpcError as e:
            fail(f"task {kind}: {e.strerror}")
        click.echo(f"task {t['id']} ({kind}) started", err=True)
        while wait and t["state"] in ("PENDING", "EXECUTING", "CANCELING"):
            time.sleep(0.2)
            t = next(x for x in c.call("task_list") if x["id"] == t["id"])
        _print_task(t)
        if t["state"] == "FAILED":
            sys.exit(1)

    cmd.__doc__ = {"import": "Import what changed in S3 since the last import.",
                   "export": "Export new and changed files, directories and symlinks to S3.",
                   "release": "Release exported files (optionally not used for DAYS)."}[kind]
    return cmd


for _kind in ("import", "export", "release"):
    task.command(_kind)(_task_command(_kind))


@task.command("list")
@click.argument("mountpoint", type=click.Path(exists=True))
@click.option("--mds", "mds_address")
def task_list(mountpoint, mds_address):
    """Tasks of this MDS run, with their states."""
    for t in _mds_client(mountpoint, mds_address).call("task_list"):
        _print_task(t)


@task.command("cancel")
@click.argument("mountpoint", type=click.Path(exists=True))
@click.argument("task_id", type=int)
@click.option("--mds", "mds_address")
def task_cancel(mountpoint, task_id, mds_address):
    """Cancel a running task."""
    from .protocol import RpcError

    try:
        _print_task(_mds_client(mountpoint, mds_address).call("task_cancel", id=task_id))
    except RpcError as e:
        fail(e.strerror)


@main.group()
def hsm():
    """The HSM coordinator's queue."""


@hsm.command("list")
@click.argument("mountpoint", type=click.Path(exists=True))
@click.option("--all", "show_all", is_flag=True, help="Include finished requests (kept 1 h).")
def hsm_list(mountpoint, show_all):
    """Requests like Lustre's hsm.actions: id, FID, action, state, bytes, error."""
    from .layout import format_fid

    ctl = _ctl(mountpoint)
    rows = json.loads(os.getxattr(ctl, "lustrefuse.hsm_list"))
    for r in rows:
        if not show_all and r["state"] not in ("WAITING", "STARTED"):
            continue
        click.echo(f"id={r['id']} fid={format_fid(r['ino'])} action={r['action']} "
                   f"status={r['state']} bytes={r['bytes']}"
                   + (f" error={r['error']!r}" if r.get("error") else ""))


def _lfs_main(args):
    from . import lfs as lfs_module

    return lfs_module.main(list(args))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lfs(args):
    """The Lustre `lfs` tool (same as the `lfs` command)."""
    sys.exit(_lfs_main(args))


# -- demo and bench -------------------------------------------------------------

@main.command()
@click.option("--dir", "base", default="/tmp/lustrefuse-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where the demo keeps its state and logs.")
@click.option("--mountpoint", type=click.Path(), help="[default: DIR/mnt]")
@click.option("--data-dir", type=click.Path(), help="[default: DIR/data]")
@click.option("--large-size", default="512M", show_default=True,
              callback=lambda c, p, v: size_option(v), help="Size of the large file (0: none).")
@click.option("--small-files", type=click.IntRange(0), default=2000, show_default=True,
              help="Number of small files (64-128 KiB).")
@click.option("--readers", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--osts", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--stripe-size", default="1M", show_default=True)
@click.option("--imported-file-chunk-size", "imported_chunk", default="64M", show_default=True,
              help="Passed to `up`: the large file is striped over the OSTs.")
@click.option("--keep-running/--no-keep-running", default=True, show_default=True,
              help="Leave the filesystem and the S3 endpoint up after the demo.")
@click.option("--stop", "stop_demo", is_flag=True, help="Stop a running demo and exit.")
def demo(**kw):
    """Start a local S3 endpoint, a sample dataset and a filesystem over it; show figures.

    Uploads one large file and a few thousand small ones to moto's S3 server on
    127.0.0.1, runs `up`, then times a lazy first read against a second read,
    `hsm_restore` of everything, parallel readers and `hsm_release`, checking every
    byte read. `lustrefuse demo --stop` stops it all.
    """
    from . import demo as demo_module

    sys.exit(demo_module.main_cli(**kw))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args):
    """Measure the system against the machine's own limits (try `lustrefuse bench --help`)."""
    from . import bench as bench_module

    sys.exit(bench_module.main(list(args)))


def entry():
    """The console script: mount.fuse3's form, or the click commands."""
    from . import fstab

    if fstab.looks_like_fstab_call(sys.argv):
        sys.exit(fstab.main(sys.argv[1:]))
    main()


if __name__ == "__main__":
    entry()
