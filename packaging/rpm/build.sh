#!/usr/bin/env bash
# Builds the RHEL 9 RPM (and its source RPM) into build/rpm/: `make rpm` runs this.
#
# 1. fetches the wheels pinned in requirements.txt and build-requirements.txt into
#    build/rpm/wheels (only what is missing; PyPI is the one network access of the build),
# 2. makes the project's sdist from the working tree with the pinned setuptools,
# 3. packs the wheels and the monitoring files (packaging/grafana, packaging/prometheus) into
#    source tarballs, and
# 4. runs rpmbuild -ba with _topdir build/rpm.
# Works on RHEL 9 (python3.11, python3.11-pip, rpm-build) and on Debian 12 (rpm), where the
# build dependencies are not in an RPM database and are not checked.
#
# Environment: PYTHON (a Python 3.11 that can create a venv with pip; default: .venv's, then
# python3.11). Everything else runs in build/rpm/buildenv, made from it.
set -euo pipefail
# The package always ships the compiled SIP core, and its %check asserts it runs: the run-time
# switch to the pure-Python core (make test's second pass sets it) must not leak in.
unset CLEARIP_PURE_PYTHON

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
top="$root/build/rpm"
spec="$here/clearip-inline-proxy.spec"
say() { printf 'rpm: %s\n' "$*"; }
die() { printf 'rpm: %s\n' "$*" >&2; exit 1; }

command -v rpmbuild >/dev/null || die "rpmbuild is missing (Debian: apt-get install rpm; RHEL: dnf install rpm-build)"

pick_python() {
    for c in "${PYTHON:-}" "$root/.venv/bin/python" python3.11; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 \
            && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
            && "$c" -c 'import ensurepip, venv' >/dev/null 2>&1; then
            command -v "$c"; return 0
        fi
    done
    return 1
}
# 3.11 exactly: the bytecode shipped in the package is for RHEL's python3.11.
python=$(pick_python) || die "needs Python 3.11 with venv (Debian: python3-venv; set PYTHON=...)"

# The spec's Version is the release being packaged; it must be the project's.
version=$("$python" -c 'import tomllib; print(tomllib.load(open("'"$root"'/pyproject.toml", "rb"))["project"]["version"])')
spec_version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
[ "$version" = "$spec_version" ] \
    || die "pyproject.toml says $version but the spec says $spec_version: update Version and %changelog"
name=clearip-inline-proxy
srcname=clearip_inline_proxy
# The sdist takes the working tree as it is: say so when that is not a commit.
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1 \
        && [ -n "$(git -C "$root" status --porcelain -- relay ctl bpf pyproject.toml setup.py)" ]; then
    say "note: relay/, ctl/ or bpf/ has uncommitted changes; the package contains them"
fi

mkdir -p "$top"/{SOURCES,SPECS,wheels}
rm -rf "$top/SOURCES"/* "$top/RPMS" "$top/SRPMS"

# --- 1. build venv and pinned wheels -------------------------------------------------------------
# A venv of our own (pip from ensurepip), which later also holds the pinned build backend.
benv="$top/buildenv"
if [ ! -x "$benv/bin/python" ] || [ ! -f "$benv/.pins" ] \
        || ! cmp -s "$here/build-requirements.txt" "$benv/.pins"; then
    rm -rf "$benv"
    "$python" -m venv "$benv"
fi
target=(--only-binary=:all: --implementation cp --python-version 3.11
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
for pins in requirements.txt build-requirements.txt; do
    if ! "$benv/bin/python" -m pip download -q --no-index --find-links "$top/wheels" --dest "$top/wheels" \
            --require-hashes --no-deps "${target[@]}" -r "$here/$pins" >/dev/null 2>&1; then
        say "downloading the wheels pinned in $pins"
        "$benv/bin/python" -m pip download -q --dest "$top/wheels" --require-hashes --no-deps \
            "${target[@]}" -r "$here/$pins"
    fi
done
vendor="$top/vendor-stage/vendor"
rm -rf "$top/vendor-stage"
"$benv/bin/python" "$here/vendor.py" collect "$top/wheels" "$vendor"

# --- 2. sdist -----------------------------------------------------------------------------------
# With the pinned build backend (pyproject.toml's build-system.requires) in the build venv.
if [ ! -f "$benv/.pins" ]; then
    "$benv/bin/python" -m pip install -q --no-index --find-links "$vendor" --require-hashes \
        -r "$here/build-requirements.txt"
    cp "$here/build-requirements.txt" "$benv/.pins"
fi
# setuptools writes its egg-info next to setup.py: remove it unless it was there before.
stage="$top/sdist-stage"
rm -rf "$stage" && mkdir -p "$stage"
had_egg_info=0
[ -e "$root/$srcname.egg-info" ] && had_egg_info=1
(cd "$root" && "$benv/bin/python" -c '
import sys
from setuptools.build_meta import build_sdist
print(build_sdist(sys.argv[1]))
' "$stage" >/dev/null)
[ "$had_egg_info" = 1 ] || rm -rf "$root/$srcname.egg-info"
sdist="$stage/$srcname-$version.tar.gz"
[ -f "$sdist" ] || die "setuptools made no $sdist"
cp "$sdist" "$top/SOURCES/"

# --- 3. source tarballs (reproducible: sorted, fixed owner and time) --------------------------
tarball() {  # tarball OUT DIR NAMES...
    local out=$1 dir=$2; shift 2
    tar -C "$dir" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "$@" \
        | gzip -n -9 > "$out"
}
tarball "$top/SOURCES/$name-$version-vendor.tar.gz" "$top/vendor-stage" vendor
mon="$top/monitoring-stage/monitoring"
rm -rf "$top/monitoring-stage" && mkdir -p "$mon/grafana" "$mon/prometheus"
find "$root/packaging/grafana" -maxdepth 1 -name '*.json' -type f -exec cp -p -t "$mon/grafana" {} + 2>/dev/null || :
find "$root/packaging/prometheus" -maxdepth 1 \( -name '*.yml' -o -name '*.yaml' \) -type f \
    -exec cp -p -t "$mon/prometheus" {} + 2>/dev/null || :
tarball "$top/SOURCES/$name-$version-monitoring.tar.gz" "$top/monitoring-stage" monitoring
cp -p "$here"/{clearip-proxy.service,clearip-proxy.xml,clearip-wrapper.in,_clearip_os_bcc.py} \
    "$here"/{clearip-os-bcc.pth,mkman.py,requirements.txt} "$top/SOURCES/"
cp -p "$spec" "$top/SPECS/"

# --- 4. rpmbuild ----------------------------------------------------------------------------------
nodeps=()
# Debian's rpm database is empty: BuildRequires cannot be checked there.
[ -f /etc/redhat-release ] || nodeps=(--nodeps)
say "rpmbuild -ba $(basename "$spec")"
log="$top/rpmbuild.log"
if ! rpmbuild -ba "${nodeps[@]}" \
        --define "_topdir $top" \
        --define "build_python $benv/bin/python" \
        --define "packager clearip-inline-proxy developers" \
        "$top/SPECS/$(basename "$spec")" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    die "rpmbuild failed (whole log: $log)"
fi
rm -rf "$top/BUILD" "$top/BUILDROOT"
for f in "$top"/RPMS/*/*.rpm "$top"/SRPMS/*.rpm; do
    say "wrote ${f#"$root"/} ($(du -h "$f" | cut -f1))"
done
