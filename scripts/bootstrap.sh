#!/usr/bin/env bash
# Sets up a machine to run clearip-inline-proxy from this checkout: OS packages, kernel
# headers for bcc, and the project's virtual environment in .venv, where the SIP core is
# compiled into C extensions (mypyc: needs a C compiler and the Python headers).
#
# Idempotent: a second run installs nothing and changes nothing. Supported: Debian 12 and
# RHEL / Rocky / Alma 9, as root (or with sudo). Usage: scripts/bootstrap.sh [--dev]
#   --dev   also install what the test suite needs (test extras, tshark, rpm tools, kamailio)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
dev=0
[ "${1:-}" = "--dev" ] && dev=1

say() { printf 'bootstrap: %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- OS packages -------------------------------------------------------------------------
. /etc/os-release
family="${ID} ${ID_LIKE:-}"

debian_packages() {
    # bcc must come from the OS: Debian's python3-bpfcc (the PyPI "bcc" is unrelated).
    # gcc, libc6-dev and python3-dev: mypyc compiles the SIP core when the project is installed.
    local pkgs=(python3-bpfcc python3-venv iproute2 sip-tester gcc libc6-dev python3-dev)
    local arch
    arch=$(dpkg --print-architecture)
    if ls "/usr/src/linux-headers-$(uname -r)" >/dev/null 2>&1; then
        :
    elif apt-cache show "linux-headers-$(uname -r)" >/dev/null 2>&1; then
        pkgs+=("linux-headers-$(uname -r)")
    else
        pkgs+=("linux-headers-$arch")
    fi
    if [ "$dev" = 1 ]; then
        pkgs+=(tshark rpm rpmlint cpio systemd kamailio nftables netsniff-ng prometheus sngrep
            xdp-tools stunnel4)
    fi
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing OS packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

rhel_packages() {
    local pkgs=(python3.11 python3.11-pip python3.11-devel gcc bcc python3-bcc iproute
        "kernel-devel-$(uname -r)")
    [ "$dev" = 1 ] && pkgs+=(rpm-build rpmlint systemd wireshark-cli nftables)
    local missing=()
    for p in "${pkgs[@]}"; do rpm -q "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing OS packages: ${missing[*]}"
        # kernel-devel for a cloud kernel may be missing from the repositories: go on without it,
        # the header link below then uses the newest kernel-devel that is installed.
        as_root dnf install -y -q --skip-broken "${missing[@]}" || true
    fi
    # SIPp lives in EPEL on RHEL; install it where it is available.
    command -v sipp >/dev/null 2>&1 || as_root dnf install -y -q sipp >/dev/null 2>&1 \
        || say "SIPp is not available from the configured repositories (tests that need it skip outside CI)"
}

case "$family" in
    *debian*) debian_packages ;;
    *rhel*|*fedora*|*centos*) rhel_packages ;;
    *) say "unsupported OS '$ID': install bcc's Python module, kernel headers and SIPp by hand" ;;
esac

# --- kernel headers ------------------------------------------------------------------------
# bcc compiles the XDP program against /lib/modules/$(uname -r)/build. Cloud and CI kernels
# rarely have matching headers; the program uses only UAPI headers, so the newest installed
# headers are a safe stand-in. We link them and say so.
mods="/lib/modules/$(uname -r)"
if [ ! -e "$mods/build" ]; then
    build=$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 /usr/src/kernels/* \
        2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$build" ]; then
        source_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
        [ -n "$source_dir" ] || source_dir="$build"
        as_root mkdir -p "$mods"
        as_root ln -sfn "$build" "$mods/build"
        as_root ln -sfn "$source_dir" "$mods/source"
        say "no kernel headers match $(uname -r): linked $build as $mods/build and $source_dir as $mods/source"
    else
        say "no kernel headers installed: the XDP filter will run in degraded mode"
    fi
fi

# --- Python virtual environment -----------------------------------------------------------------
pick_python() {
    for c in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 \
            && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    return 1
}

if [ ! -x "$venv/bin/python" ]; then
    py=$(pick_python) || { say "Python 3.11 or newer is required"; exit 1; }
    say "creating $venv with $py"
    "$py" -m venv "$venv"
fi

# Let the venv see the OS's bcc module, and only it: a private folder holding a link to the
# OS's bcc package, put on sys.path by a .pth file.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$venv/bin/python" -c 'import bcc' >/dev/null 2>&1; then
    bcc_dir=$(ls -d /usr/lib/python3/dist-packages/bcc /usr/lib/python3*/site-packages/bcc \
        2>/dev/null | head -n 1 || true)
    if [ -n "$bcc_dir" ]; then
        mkdir -p "$venv/os-bcc"
        ln -sfn "$bcc_dir" "$venv/os-bcc/bcc"
        echo "$venv/os-bcc" > "$site/clearip-os-bcc.pth"
        say "the venv uses the OS's bcc from $bcc_dir"
    else
        say "the OS's bcc Python module is not installed: the XDP filter will run in degraded mode"
    fi
fi

extras=""
[ "$dev" = 1 ] && extras="[test]"
stamp="$venv/.installed$(printf '%s' "$extras" | tr -d '[]')"
# Reinstalled when the packaging changes, when a source of the compiled core changes (the
# extensions built in place would otherwise be stale; relay/__init__.py then falls back to
# the .py files) and when a compiler or the Python headers appear.
toolchain=$("$venv/bin/python" -c 'import os, shutil, sysconfig
print(shutil.which((os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]),
      os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))')
# The compiled sources are the ones relay/coresources.py names (loaded by path: importing the
# relay package would run its start-up checks).
core=$("$venv/bin/python" -c 'import importlib.util, sys
spec = importlib.util.spec_from_file_location("cs", sys.argv[1] + "/relay/coresources.py")
cs = importlib.util.module_from_spec(spec); spec.loader.exec_module(cs)
print(cs.core_digest(sys.argv[1] + "/relay"))' "$here")
want=$( { cat "$here/pyproject.toml" "$here/setup.py" "$here/relay/coresources.py"
          echo "$toolchain $core"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing the project into $venv ${extras:+with $extras} (compiling the SIP core)"
    log="$venv/pip-install.log"
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip \
            && "$venv/bin/python" -m pip install -v -e "$here$extras"; } >"$log" 2>&1; then
        cat "$log"; say "pip install failed (log above, also in $log)"; exit 1
    fi
    if [ "$(env -u CLEARIP_PURE_PYTHON "$venv/bin/python" -c 'import clearip.relay as r; print(r.core_build())')" != compiled ]; then
        # setup.py's own message, which pip shows only in its log.
        say "$(grep -m1 -o 'clearip-inline-proxy: .*' "$log" || echo 'the SIP core is not compiled')"
    fi
    echo "$want" > "$stamp"
fi
