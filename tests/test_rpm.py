"""The RHEL 9 package (issue 9): `make rpm` builds it, rpmlint accepts it, its payload runs.

The package is built once per session (``make rpm``, about 15 s with the wheels cached) and
its payload extracted with ``rpm2cpio | cpio``; the extracted commands then run with this
machine's ``/usr/bin/python3.11`` and nothing else but the extracted tree (and the OS's bcc).
rpmbuild, rpmlint, systemd-analyze, rpm2cpio and cpio come from ``scripts/bootstrap.sh --dev``;
without them these tests skip, or fail under ``CI=true``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "rpm" / "clearip-inline-proxy.spec"
RPMLINT_CONFIG = PACKAGING / "rpm" / "rpmlint.toml"
TARGET_PYTHON = "/usr/bin/python3.11"
IN_CI = os.environ.get("CI", "").lower() == "true"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

REQUIRED_FILES = [
    "/usr/bin/clearip-proxy",
    "/usr/bin/clearipctl",
    "/usr/lib/systemd/system/clearip-proxy.service",
    "/etc/clearip-proxy/proxy.toml",
    "/etc/clearip-proxy/trust.toml",
    "/var/lib/clearip-proxy",
    "/usr/lib/firewalld/services/clearip-proxy.xml",
    "/usr/share/clearip-proxy/grafana",
    "/usr/share/clearip-proxy/prometheus",
    "/opt/clearip-proxy/bin/python3",
    "/opt/clearip-proxy/pyvenv.cfg",
    "/opt/clearip-proxy/lib/python3.11/site-packages/clearip/relay/cli.py",
    "/opt/clearip-proxy/lib/python3.11/site-packages/clearip/ctl/cli.py",
    # The kernel programs' C sources and the header they share: bcc compiles them at run time.
    "/opt/clearip-proxy/lib/python3.11/site-packages/clearip/bpf/xdp_filter.c",
    "/opt/clearip-proxy/lib/python3.11/site-packages/clearip/bpf/reuseport.c",
    "/opt/clearip-proxy/lib/python3.11/site-packages/clearip/bpf/emergency_invite.h",
    "/opt/clearip-proxy/lib/python3.11/site-packages/clearip-os-bcc.pth",
]


def need(*tools: str) -> None:
    """Skips (fails under CI=true) when a tool the test needs is missing."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if not missing:
        return
    reason = f"needs {', '.join(missing)}: run scripts/bootstrap.sh --dev"
    if IN_CI:
        pytest.fail(f"CI=true but prerequisite missing: {reason}")
    pytest.skip(reason)


def run(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, env=env, cwd=cwd
    )


@dataclass(frozen=True)
class Built:
    rpm: Path
    srpm: Path
    payload: Path  # the binary RPM's files, extracted

    def query(self, *options: str) -> str:
        result = run("rpm", "-qp", *options, self.rpm)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    need("make", "rpmbuild", "rpm", "rpm2cpio", "cpio")
    result = run("make", "-s", "rpm", cwd=ROOT)
    assert result.returncode == 0, (
        f"make rpm failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    rpms = sorted((ROOT / "build/rpm/RPMS/x86_64").glob(f"clearip-inline-proxy-{VERSION}-*.rpm"))
    srpms = sorted((ROOT / "build/rpm/SRPMS").glob(f"clearip-inline-proxy-{VERSION}-*.src.rpm"))
    assert len(rpms) == 1 and len(srpms) == 1, (rpms, srpms)
    payload = tmp_path_factory.mktemp("payload")
    extract = subprocess.run(
        f"rpm2cpio '{rpms[0]}' | cpio -idm --quiet",
        shell=True,
        cwd=payload,
        capture_output=True,
        text=True,
        check=False,
    )
    assert extract.returncode == 0, extract.stderr
    return Built(rpms[0], srpms[0], payload)


def payload_env(built: Built) -> dict[str, str]:
    """A bare environment: no venv, no PYTHONPATH; the wrappers find the extracted tree."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "CLEARIP_PREFIX": str(built.payload / "opt/clearip-proxy"),
    }


def test_make_rpm_builds_the_package(built: Built) -> None:
    fields = built.query("--qf", "%{NAME} %{VERSION} %{ARCH} %{LICENSE}").split(" ", 3)
    assert fields[:3] == ["clearip-inline-proxy", VERSION, "x86_64"]
    assert fields[3].startswith("Apache-2.0")


def test_rpmlint_reports_no_errors_and_the_spec_explains_every_warning(built: Built) -> None:
    need("rpmlint")
    result = run("rpmlint", "-c", RPMLINT_CONFIG, built.rpm, built.srpm, SPEC)
    summary = re.search(r"(\d+) errors, (\d+) warnings", result.stdout)
    assert summary, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if ": E: " in line]
    assert summary.group(1) == "0" and not errors, "\n".join(errors)
    assert result.returncode == 0
    warnings = set(re.findall(r": W: (\S+)", result.stdout))
    spec_comments = "\n".join(
        line for line in SPEC.read_text().splitlines() if line.startswith("#")
    )
    unexplained = sorted(w for w in warnings if w not in spec_comments)
    assert not unexplained, f"rpmlint warnings the spec's comments do not explain: {unexplained}"


def test_package_lists_every_required_file(built: Built) -> None:
    files = set(built.query("-l").splitlines())
    missing = [f for f in REQUIRED_FILES if f not in files]
    assert not missing, missing
    assert any(re.fullmatch(r"/usr/share/man/man8/clearip-proxy\.8(\.gz)?", f) for f in files)
    assert any(re.fullmatch(r"/usr/share/man/man8/clearipctl\.8(\.gz)?", f) for f in files)
    # Dashboards and alert rules: whatever packaging/grafana and packaging/prometheus hold.
    dashboards = sorted((PACKAGING / "grafana").glob("*.json"))
    rules = sorted((PACKAGING / "prometheus").glob("*.yml"))
    assert dashboards and rules, "packaging/grafana/*.json and packaging/prometheus/*.yml"
    for source, kind in [(d, "grafana") for d in dashboards] + [(r, "prometheus") for r in rules]:
        packaged = f"/usr/share/clearip-proxy/{kind}/{source.name}"
        assert packaged in files
        assert (built.payload / packaged.lstrip("/")).read_bytes() == source.read_bytes()
    # Nothing of the build leaks in: no console scripts naming the build's Python, no build-id.
    assert not [
        f for f in files if "/site-packages/bin/" in f or f.startswith("/usr/lib/.build-id")
    ]


def test_config_and_trust_list_survive_upgrades(built: Built) -> None:
    flags = dict(
        line.split(" ", 1)
        for line in built.query("--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines()
    )
    for path in ("/etc/clearip-proxy/proxy.toml", "/etc/clearip-proxy/trust.toml"):
        assert "c" in flags[path] and "n" in flags[path], (path, flags[path])
    packaged = (built.payload / "etc/clearip-proxy/proxy.toml").read_bytes()
    assert packaged == (ROOT / "relay/data/proxy.toml").read_bytes()


def test_requires_and_recommends(built: Built) -> None:
    requires = {line.split()[0] for line in built.query("--requires").splitlines()}
    assert {"python3.11", "python3-bcc", "bcc", "systemd", "firewalld-filesystem"} <= requires
    # The bundled shared objects must not leak sonames or their bundled libraries' names.
    assert not [r for r in requires if ".so" in r], requires
    assert "kernel-devel" in built.query("--recommends").split()
    provides = built.query("--provides")
    assert not [p for p in provides.splitlines() if ".so" in p]
    pins = (PACKAGING / "rpm/requirements.txt").read_text()
    for name, version in re.findall(r"^([\w.-]+)==(\S+)", pins, re.M):
        assert f"bundled(python3dist({name})) = {version}" in provides


def test_scriptlets_enable_restart_and_detach(built: Built) -> None:
    scripts = built.query("--scripts")
    sections = dict(
        re.findall(
            r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.S | re.M
        )
    )
    assert "clearip-proxy.service" in sections["postinstall"]
    preun = sections["preuninstall"]
    assert "clearip-proxy.service" in preun
    # Erase detaches the kernel filter, tolerantly, after the service stopped.
    assert re.search(r"/usr/bin/clearipctl xdp detach\S* \|\| :", preun)
    assert preun.index("clearip-proxy.service") < preun.index("xdp detach")
    # ... and unpins the worker steering program, on erase only (upgrades keep the pins).
    steering = re.search(r"if \[ \$1 -eq 0 \]; then\n(.*?)\nfi", preun, re.S)
    assert steering and re.search(r"/usr/bin/clearipctl steering remove \|\| :", steering[1])
    assert "steering remove" not in sections["postuninstall"]
    assert "clearip-proxy.service" in sections["postuninstall"]
    # No command touches the config or the trust list.
    commands = [line for line in scripts.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in commands if "/etc/clearip-proxy" in line]


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_the_required_settings(built: Built) -> None:
    unit = unit_settings(
        (built.payload / "usr/lib/systemd/system/clearip-proxy.service").read_text()
    )
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "mixed",  # SIGTERM to the supervisor, which stops its workers
        "Restart": "always",
        "WantedBy": "multi-user.target",
        "After": "network-online.target",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "clearip-proxy",
        "RuntimeDirectoryMode": "0700",
        "ExecStart": "/usr/bin/clearip-proxy run --config /etc/clearip-proxy/proxy.toml",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    assert unit["WatchdogSec"] and unit["LimitNOFILE"]
    assert int(unit["LimitNOFILE"][0]) >= 65536
    assert set(unit["ReadWritePaths"][0].split()) == {
        "/var/lib/clearip-proxy",
        "/sys/fs/bpf",
        "/etc/clearip-proxy",  # clearipctl trust add/remove: the daemon rewrites trust.toml
    }
    caps = set(unit["CapabilityBoundingSet"][0].split())
    assert caps <= {
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_ADMIN",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_ADMIN",
    }
    assert "-HUP" in unit["ExecReload"][0]


def test_systemd_analyze_verify_accepts_the_unit(built: Built, tmp_path: Path) -> None:
    need("systemd-analyze")
    unit = (built.payload / "usr/lib/systemd/system/clearip-proxy.service").read_text()
    # The commands must exist for verify: point them at the extracted payload.
    unit = unit.replace("ExecStart=/usr/bin/", f"ExecStart={built.payload}/usr/bin/")
    (tmp_path / "clearip-proxy.service").write_text(unit)
    # Documentation=man:... must resolve to the packaged pages (checked where man exists).
    env = dict(os.environ, MANPATH=str(built.payload / "usr/share/man"))
    man = [] if shutil.which("man") else ["--man=no"]
    result = run("systemd-analyze", "verify", *man, tmp_path / "clearip-proxy.service", env=env)
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


def test_firewalld_service_opens_the_sip_ports(built: Built) -> None:
    tree = ET.parse(built.payload / "usr/lib/firewalld/services/clearip-proxy.xml")
    ports = {(p.get("protocol"), p.get("port")) for p in tree.getroot().iter("port")}
    assert ports == {("udp", "5060"), ("tcp", "5060"), ("tcp", "5061")}


def test_man_pages_come_from_the_help(built: Built) -> None:
    for prog in ("clearip-proxy", "clearipctl"):
        page = built.payload / f"usr/share/man/man8/{prog}.8.gz"
        text = (
            gzip.decompress(page.read_bytes()).decode()
            if page.exists()
            else (page.with_suffix("").read_text())
        )
        assert text.startswith(".TH ") and ".SH SYNOPSIS" in text
        assert "show this help message and exit" in text


def test_payload_check_config_accepts_the_packaged_default(built: Built, tmp_path: Path) -> None:
    need(TARGET_PYTHON)
    etc = built.payload / "etc/clearip-proxy"
    # The packaged config names /etc/clearip-proxy/trust.toml: point it at the extracted one.
    config = (etc / "proxy.toml").read_text()
    config, n = re.subn(r'(?m)^trust_file = ".*"$', f'trust_file = "{etc / "trust.toml"}"', config)
    assert n == 1
    (tmp_path / "proxy.toml").write_text(config)
    result = run(
        built.payload / "usr/bin/clearip-proxy",
        "check-config",
        "--config",
        tmp_path / "proxy.toml",
        env=payload_env(built),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_payload_clearipctl_help(built: Built, tmp_path: Path) -> None:
    need(TARGET_PYTHON)
    result = run(
        built.payload / "usr/bin/clearipctl", "--help", env=payload_env(built), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: clearipctl")


def test_payload_uses_only_its_tree_the_os_python_and_the_os_bcc(
    built: Built, tmp_path: Path
) -> None:
    need(TARGET_PYTHON)
    prefix = built.payload / "opt/clearip-proxy"
    probe = (
        "import json, sys, importlib\n"
        "mods = {}\n"
        "for name in ('clearip.relay.cli', 'cryptography.hazmat.bindings._rust', 'uvloop',"
        " 'pyroute2', 'prometheus_client', 'cffi'):\n"
        "    mods[name] = importlib.import_module(name).__file__\n"
        "try:\n"
        "    import bcc\n"
        "    mods['bcc'] = bcc.__file__\n"
        "except ImportError:\n"
        "    mods['bcc'] = None\n"
        "print(json.dumps({'path': sys.path, 'prefix': sys.prefix, 'exe': sys.executable,"
        " 'mods': mods}))\n"
    )
    result = run(
        prefix / "bin/python3", "-I", "-B", "-c", probe, env=payload_env(built), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert os.path.realpath(info["exe"]) == os.path.realpath(TARGET_PYTHON)
    assert info["prefix"] == str(prefix)
    stdlib = ("/usr/lib/python3.11", "/usr/lib/python311.zip", "/usr/local/lib/python3.11")
    strays = [p for p in info["path"] if not p.startswith((str(prefix), *stdlib))]
    assert not strays, f"sys.path reaches outside the package and the OS's Python: {strays}"
    for name, path in info["mods"].items():
        if name != "bcc":
            assert path.startswith(str(prefix)), (name, path)
    # The OS's bcc, and only that package, is visible (Debian: python3-bpfcc).
    os_bcc = any(
        Path(d, "bcc/__init__.py").exists()
        for d in ("/usr/lib/python3/dist-packages", "/usr/lib/python3.9/site-packages")
    )
    if os_bcc:
        assert info["mods"]["bcc"] and not info["mods"]["bcc"].startswith(str(prefix))
    elif IN_CI:
        pytest.fail("CI=true but the OS's bcc module is missing: run scripts/bootstrap.sh --dev")


def test_payload_runs_the_compiled_core(built: Built, tmp_path: Path) -> None:
    """The package carries the SIP core compiled by mypyc at build time, and uses it."""
    need(TARGET_PYTHON)
    prefix = built.payload / "opt/clearip-proxy"
    probe = "import clearip.relay as r; from clearip.relay.sip import parser; "
    probe += "from clearip.relay.service import dispatch; from clearip.relay.transport import udp; "
    probe += "print(r.core_build(), parser.__file__, dispatch.__file__, udp.__file__)"
    result = run(
        prefix / "bin/python3", "-I", "-B", "-c", probe, env=payload_env(built), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    build, *files = result.stdout.split()
    assert build == "compiled", result.stdout + result.stderr
    for file in files:  # the core and the shell modules every message goes through
        assert file.startswith(str(prefix)) and file.endswith(".so"), file
