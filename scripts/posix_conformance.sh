#!/usr/bin/env bash
# POSIX conformance of a lustrefuse mount, measured from outside with pjdfstest.
#
# Starts a private moto S3 server and a lustrefuse mount in a temporary
# directory, runs pjdfstest's TAP suite over it with prove (optionally over a
# tmpfs too, as the reference), prints a summary table and always cleans up.
# pjdfstest itself is NOT part of this repository: point the script at a
# built checkout (a directory holding the `pjdfstest` binary and `tests/`).
#
# See docs/posix_conformance.md for results and the diagnosis of failures.
set -euo pipefail

usage() {
	cat <<'EOF'
usage: scripts/posix_conformance.sh [options] [PJDFSTEST_DIR]

Run pjdfstest (https://github.com/pjd/pjdfstest) against a fresh lustrefuse
mount backed by a private moto S3 server, and print a per-directory summary.
Must run as root (pjdfstest switches to uid 65534 etc. and creates device nodes).

PJDFSTEST_DIR   a built pjdfstest checkout: contains the `pjdfstest` binary and
                `tests/` (default: $PJDFSTEST)

options:
  --compare-tmpfs     also run the suite on a tmpfs and list the assertions
                      that fail on lustrefuse but pass on tmpfs
  --dirs "A B ..."    test directories to run (default: every tests/* dir,
                      except chflags which is BSD-only)
  --timeout SECS      wall-clock limit per test directory (default: 1200)
  --results DIR       keep the TAP logs and summary here (default: inside the
                      temporary work dir, removed at exit)
  --keep              do not delete the temporary work dir (mount is still
                      taken down)
  --lustrefuse BIN    lustrefuse executable (default: the repo's .venv, then PATH)
  -h, --help          this help

environment:
  PJDFSTEST           default PJDFSTEST_DIR
  PYTHON              python with boto3 (default: next to the lustrefuse binary)

exit status: 0 if every selected directory ran to completion (failures of
individual assertions do not change it), 2 on setup errors.
EOF
}

die() { echo "posix_conformance: $*" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
pjd=${PJDFSTEST:-}
compare_tmpfs=0
dirs=""
per_dir_timeout=1200
results=""
keep=0
lf_bin=""

while [ $# -gt 0 ]; do
	case "$1" in
	-h|--help) usage; exit 0 ;;
	--compare-tmpfs) compare_tmpfs=1 ;;
	--dirs) shift; [ $# -gt 0 ] || die "--dirs needs a value"; dirs=$1 ;;
	--timeout) shift; [ $# -gt 0 ] || die "--timeout needs a value"; per_dir_timeout=$1 ;;
	--results) shift; [ $# -gt 0 ] || die "--results needs a value"; results=$1 ;;
	--keep) keep=1 ;;
	--lustrefuse) shift; [ $# -gt 0 ] || die "--lustrefuse needs a value"; lf_bin=$1 ;;
	-*) die "unknown option $1 (see --help)" ;;
	*) pjd=$1 ;;
	esac
	shift
done

[ -n "$pjd" ] || die "no pjdfstest checkout given (argument or PJDFSTEST; see --help)"
pjd_abs=$(cd "$pjd" 2>/dev/null && pwd) || die "cannot enter $pjd"
pjd=$pjd_abs
[ -x "$pjd/pjdfstest" ] || die "$pjd/pjdfstest is missing or not executable (build it first)"
[ -f "$pjd/tests/misc.sh" ] || die "$pjd/tests/misc.sh not found"
[ "$(id -u)" = 0 ] || die "must run as root"
command -v prove >/dev/null || die "prove (perl) not found"
[ -e /dev/fuse ] || die "/dev/fuse not available"
case "$per_dir_timeout" in ''|*[!0-9]*) die "--timeout must be a number of seconds" ;; esac

if [ -z "$lf_bin" ]; then
	if [ -x "$repo/.venv/bin/lustrefuse" ]; then
		lf_bin=$repo/.venv/bin/lustrefuse
	else
		lf_bin=$(command -v lustrefuse) || die "lustrefuse not found (use --lustrefuse)"
	fi
fi
bindir=$(dirname "$lf_bin")
py=${PYTHON:-$bindir/python}
[ -x "$py" ] || py=$(command -v python3)
moto=$bindir/moto_server
[ -x "$moto" ] || moto=$(command -v moto_server) || die "moto_server not found"

if [ -z "$dirs" ]; then
	for d in "$pjd"/tests/*/; do
		d=$(basename "$d")
		[ "$d" = chflags ] && continue
		dirs="$dirs $d"
	done
fi

work=$(mktemp -d /tmp/posix_conformance.XXXXXX)
[ -n "$results" ] || results=$work/results
mkdir -p "$results" "$work/mnt" "$work/tmpfs"
results=$(cd "$results" && pwd)
moto_pid=""
child=""
mounted=0
tmpfs_mounted=0

cleanup() {
	local rc=$?
	set +e
	cd /
	if [ -n "$child" ]; then
		kill -TERM "$child" 2>/dev/null  # timeout(1) passes it on to prove and the tests
		wait "$child" 2>/dev/null
	fi
	if [ "$mounted" = 1 ]; then
		timeout 120 "$lf_bin" down "$work/mnt" >/dev/null 2>&1 ||
			timeout 60 "$lf_bin" down --force "$work/mnt" >/dev/null 2>&1 ||
			fusermount3 -uz "$work/mnt" 2>/dev/null
	fi
	if [ "$tmpfs_mounted" = 1 ]; then
		umount "$work/tmpfs" 2>/dev/null || umount -l "$work/tmpfs"
	fi
	if [ -n "$moto_pid" ]; then
		kill "$moto_pid" 2>/dev/null
		wait "$moto_pid" 2>/dev/null
	fi
	if [ "$keep" = 1 ]; then
		echo "posix_conformance: work dir kept: $work" >&2
	elif ! mountpoint -q "$work/mnt" && ! mountpoint -q "$work/tmpfs"; then
		rm -rf "$work"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "== $*" >&2; }

# --- S3 (moto) -------------------------------------------------------------
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
log "moto_server on 127.0.0.1:$port"
"$moto" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
"$py" - "$port" <<'EOF' || die "moto_server did not come up (see log)"
import socket, sys, time
deadline = time.time() + 30
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
bucket=pjdfstest
"$py" -c "import boto3,sys; boto3.client('s3', endpoint_url='http://127.0.0.1:$port').create_bucket(Bucket='$bucket')" ||
	die "cannot create bucket"

# --- lustrefuse mount ------------------------------------------------------
log "lustrefuse up s3://$bucket $work/mnt"
timeout 180 "$lf_bin" up "s3://$bucket" "$work/mnt" --endpoint-url "http://127.0.0.1:$port" \
	--data-dir "$work/dd" >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; die "lustrefuse up failed"; }
mounted=1
mountpoint -q "$work/mnt" || die "$work/mnt is not a mountpoint after lustrefuse up"

# --- run pjdfstest ---------------------------------------------------------
# run_suite NAME MOUNTPOINT: one prove per test directory, verbose TAP kept.
run_suite() {
	local name=$1 mnt=$2 d rc t0
	mkdir -p "$results/$name"
	: >"$results/$name/seconds"
	for d in $dirs; do
		[ -d "$pjd/tests/$d" ] || { echo "skip $d (no such directory)" >&2; continue; }
		log "$name: $d"
		t0=$(date +%s)
		set +e
		# In the background + wait, so that a signal reaches our trap at once.
		(cd "$mnt" && exec timeout -k 10 "$per_dir_timeout" prove -v -r "$pjd/tests/$d") \
			>"$results/$name/$d.tap" 2>"$results/$name/$d.stderr" &
		child=$!
		wait "$child"
		rc=$?
		child=""
		set -e
		[ "$rc" = 124 ] && echo "# TIMEOUT after ${per_dir_timeout}s" >>"$results/$name/$d.tap"
		echo "$d $(( $(date +%s) - t0 ))" >>"$results/$name/seconds"
		# Leave nothing behind for the next directory (tests normally clean up).
		find "$mnt" -mindepth 1 -maxdepth 1 -exec rm -rf {} + 2>/dev/null || true
	done
}

run_suite lustrefuse "$work/mnt"
cp "$work"/dd/log/*.log "$results/lustrefuse/" 2>/dev/null || true

if [ "$compare_tmpfs" = 1 ]; then
	mount -t tmpfs none "$work/tmpfs" || die "cannot mount tmpfs"
	tmpfs_mounted=1
	run_suite tmpfs "$work/tmpfs"
fi

# --- summary ---------------------------------------------------------------
"$py" - "$results" "$dirs" "$compare_tmpfs" <<'EOF' | tee "$results/summary.txt"
import os, re, sys

results, dirs, compare = sys.argv[1], sys.argv[2].split(), sys.argv[3] == "1"
file_re = re.compile(r"^(\S+/tests/(\S+?\.t)) \.\.")
plan_re = re.compile(r"^1\.\.(\d+)")
ok_re = re.compile(r"^(not )?ok (\d+)(.*)$")


def parse(name):
    """{test file: {"plan", "ran", "fail": {n: line}, "timeout"}} from prove -v output."""
    out = {}
    for d in dirs:
        path = os.path.join(results, name, d + ".tap")
        if not os.path.exists(path):
            continue
        cur = None
        for line in open(path, errors="replace"):
            line = line.rstrip("\n")
            m = file_re.match(line)
            if m:
                cur = out.setdefault(m.group(2), {"plan": 0, "ran": set(), "fail": {}, "timeout": False})
                rest = line[m.end():].strip()
                line = rest
            if cur is None:
                continue
            if line.startswith("# TIMEOUT"):
                cur["timeout"] = True
            m = plan_re.match(line)
            if m:
                cur["plan"] = int(m.group(1))
                continue
            m = ok_re.match(line)
            if m:
                n = int(m.group(2))
                cur["ran"].add(n)
                todo = "# TODO" in m.group(3)
                if m.group(1) and not todo:
                    cur["fail"][n] = line
    return out


def totals(res, d=None):
    files = asserts = failed = 0
    for f, r in res.items():
        if d and not f.startswith(d + "/"):
            continue
        files += 1
        n = max(r["plan"], max(r["ran"], default=0))
        missing = n - len(r["ran"])
        asserts += n
        failed += len(r["fail"]) + max(missing, 0)
    return files, asserts, failed


names = ["lustrefuse"] + (["tmpfs"] if compare else [])
res = {n: parse(n) for n in names}
secs = {}
for n in names:
    secs[n] = {}
    path = os.path.join(results, n, "seconds")
    if os.path.exists(path):
        for line in open(path):
            k, _, v = line.partition(" ")
            secs[n][k] = int(v)

hdr = f"{'directory':<16}" + "".join(f"{n + ' files/asserts/failed/secs':>42}" for n in names)
print(hdr)
print("-" * len(hdr))
for d in dirs:
    row = f"{d:<16}"
    for n in names:
        f, a, x = totals(res[n], d)
        row += f"{f:>14}{a:>10}{x:>10}{secs[n].get(d, 0):>8}"
    print(row)
print("-" * len(hdr))
row = f"{'TOTAL':<16}"
for n in names:
    f, a, x = totals(res[n])
    row += f"{f:>14}{a:>10}{x:>10}{sum(secs[n].values()):>8}"
print(row)
print()
for n in names:
    f, a, x = totals(res[n])
    print(f"{n}: {f} test files, {a} assertions, {a - x} passed, {x} failed")
print()
print("failing assertions on lustrefuse:")
for f in sorted(res["lustrefuse"]):
    r = res["lustrefuse"][f]
    bad = sorted(r["fail"])
    n = max(r["plan"], max(r["ran"], default=0))
    missing = sorted(set(range(1, n + 1)) - r["ran"])
    if bad or missing or r["timeout"]:
        extra = f" (not run: {len(missing)})" if missing else ""
        extra += " TIMEOUT" if r["timeout"] else ""
        print(f"  {f}: {','.join(map(str, bad))}{extra}")
if compare:
    print()
    print("fail on lustrefuse but pass on tmpfs:")
    only = 0
    for f in sorted(res["lustrefuse"]):
        lf, tf = res["lustrefuse"][f], res["tmpfs"].get(f)
        if tf is None:
            continue
        for k in sorted(lf["fail"]):
            if k in tf["ran"] and k not in tf["fail"]:
                only += 1
                print(f"  {f} #{k}: {lf['fail'][k][len('not ok ' + str(k)):].strip(' -')}")
    print(f"  ({only} assertions)")
lf_files, lf_a, lf_x = totals(res["lustrefuse"])
print()
print(f"lustrefuse: {lf_a - lf_x} passed, {lf_x} failed")
EOF
case "$results" in
"$work"/*) [ "$keep" = 1 ] || log "TAP logs are removed at exit; pass --results DIR to keep them" ;;
*) log "TAP logs and summary: $results" ;;
esac
