#!/usr/bin/env bash
# Install what is missing on a fresh Debian/Ubuntu machine, then run `lustrefuse demo`.
#
#   ./scripts/demo.sh                 # install if needed, run the demo (arguments go to the demo)
#   ./scripts/demo.sh --stop          # stop the demo's filesystem and S3 endpoint
#   ./scripts/demo.sh --install-only  # just the apt packages, .venv and the editable install
#
# Run it as root (or with sudo available): apt packages, FUSE mounts with allow_other.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="fuse3 libfuse3-dev pkg-config attr python3-venv python3-dev gcc"

have_everything() {
    command -v fusermount3 >/dev/null && command -v pkg-config >/dev/null &&
        pkg-config --exists fuse3 && command -v gcc >/dev/null && command -v getfattr >/dev/null &&
        python3 -c 'import ensurepip, venv, sysconfig, os, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null
}

install_apt() {
    if have_everything; then
        return
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "demo.sh: need root (or sudo) for: apt-get install $APT_PACKAGES" >&2; exit 1; }
        sudo="sudo"
    fi
    echo "installing $APT_PACKAGES ..."
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq update
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends $APT_PACKAGES >/dev/null
}

install_venv() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    if ! .venv/bin/python -c 'import lustrefuse.cli, moto, pyfuse3, pytest' 2>/dev/null; then
        echo "installing lustrefuse into .venv (builds pyfuse3: about a minute) ..."
        .venv/bin/pip install -q --upgrade pip
        .venv/bin/pip install -q -e '.[test]'
    fi
}

case "${1:-}" in
    --stop)
        exec .venv/bin/lustrefuse demo --stop
        ;;
    --install-only)
        install_apt
        install_venv
        exit 0
        ;;
esac

install_apt
install_venv
exec .venv/bin/lustrefuse demo "$@"
