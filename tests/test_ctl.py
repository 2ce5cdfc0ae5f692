"""clearipctl without root: trust commands on the file when no daemon runs, every error path
exits 2 and changes nothing, and the same commands against a ControlServer (the daemon's side)
with the kernel filter off; the control socket survives garbage."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearip.relay.policy.emergency import EmergencyNumbers
from clearip.relay.policy.sources import SourcePolicy
from clearip.relay.policy.trust import TrustList, load_trust_file
from clearip.relay.service.control import ControlServer

ONE_SWITCH = '[[source]]\ncidr = "192.0.2.1/32"\nrole = "switch"\n'


def ctl(
    tmp: Path, *args: str, socket_path: Path | None = None, columns: int = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clearip.ctl.cli",
            "--socket",
            str(socket_path or tmp / "none.sock"),
            "--trust-file",
            str(tmp / "trust.toml"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": str(columns)},
    )


class Daemon:
    """A ControlServer on its own event loop thread, as the daemon runs it (kernel filter off)."""

    def __init__(self, tmp: Path, **server_options: int) -> None:
        self.trust_file = tmp / "trust.toml"
        self.policy = SourcePolicy(
            load_trust_file(self.trust_file), self.trust_file, EmergencyNumbers(), tmp / "state"
        )
        self.policy.attach_kernel(None, "no kernel headers at /lib/modules/x/build")
        self.socket = tmp / "control.sock"
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(
            str(self.socket),
            self.policy,
            lambda: {"uptime_s": 12.5, "listeners": ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]},
            lambda: {"relay": {"untrusted_dropped": 3}},
            **server_options,
        )
        self.loop.run_until_complete(self.server.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.run_until_complete(self.server.close())
        self.loop.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    (tmp_path / "trust.toml").write_text(ONE_SWITCH)
    running = Daemon(tmp_path, allow_uid=os.getuid())
    yield running
    running.close()


def test_trust_commands_work_on_the_file_when_no_daemon_runs(tmp_path: Path) -> None:
    added = ctl(tmp_path, "trust", "add", "192.0.2.0/24", "--role", "switch", "--note", "core")
    assert added.returncode == 0, added.stderr  # no file yet: the first entry creates it
    assert "daemon not running" in added.stdout
    assert ctl(tmp_path, "trust", "add", "2001:db8::/32", "--role", "provider").returncode == 0
    listed = json.loads(ctl(tmp_path, "trust", "list", "--json").stdout)
    assert listed == [
        {"cidr": "192.0.2.0/24", "role": "switch", "note": "core"},
        {"cidr": "2001:db8::/32", "role": "provider", "note": ""},
    ]
    table = ctl(tmp_path, "trust", "list").stdout.splitlines()
    assert table[0].split() == ["CIDR", "ROLE", "NOTE"]
    assert table[1].split() == ["192.0.2.0/24", "switch", "core"]
    assert table[1].index("switch") == table[2].index("provider")  # aligned columns
    exported = ctl(tmp_path, "trust", "export").stdout
    (tmp_path / "other.toml").write_text(exported)
    removed = ctl(tmp_path, "trust", "remove", "192.0.2.0/24")
    assert removed.returncode == 0 and "daemon not running" in removed.stdout
    assert len(load_trust_file(tmp_path / "trust.toml")) == 1
    assert ctl(tmp_path, "trust", "import", str(tmp_path / "other.toml")).returncode == 0
    assert len(load_trust_file(tmp_path / "trust.toml")) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("trust", "add", "192.0.2.1/32", "--role", "switch"), "already"),
        (("trust", "add", "10.0.0.1/8", "--role", "switch"), "host bits"),
        (("trust", "add", "nonsense", "--role", "switch"), "invalid address"),
        (("trust", "add", "192.0.2.9", "--role", "sbc"), "invalid choice"),
        (("trust", "add", "192.0.2.9"), "--role"),
        (("trust", "remove", "198.51.100.0/24"), "not in the trust list"),
        (("trust", "import", "/nonexistent/trust.toml"), "cannot read"),
        (("trust", "import", "{bad}"), "not a trust file"),
        (("trust", "import", "{dup}"), "already in the trust list"),
        (("frobnicate",), "invalid choice"),
    ],
)
@pytest.mark.parametrize("with_daemon", [False, True])
def test_bad_input_exits_2_and_changes_nothing(
    tmp_path: Path, args: tuple[str, ...], needle: str, with_daemon: bool
) -> None:
    (tmp_path / "trust.toml").write_text(ONE_SWITCH)
    (tmp_path / "bad.toml").write_text("[[source]\ncidr = ")
    (tmp_path / "dup.toml").write_text(ONE_SWITCH + "\n" + ONE_SWITCH)
    args = tuple(a.format(bad=tmp_path / "bad.toml", dup=tmp_path / "dup.toml") for a in args)
    before = (tmp_path / "trust.toml").read_text()
    running = Daemon(tmp_path, allow_uid=os.getuid()) if with_daemon else None
    try:
        result = ctl(tmp_path, *args, socket_path=running.socket if running else None)
    finally:
        if running is not None:
            running.close()
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    assert needle in result.stderr
    assert result.stdout == ""
    assert (tmp_path / "trust.toml").read_text() == before


@pytest.mark.parametrize(
    "args", [("status",), ("stats", "--json"), ("top-dropped",), ("emergency", "list")]
)
def test_daemon_commands_say_when_the_daemon_is_down(tmp_path: Path, args: tuple[str]) -> None:
    result = ctl(tmp_path, *args)
    assert result.returncode == 3
    assert "not running" in result.stderr


def test_help_documents_exit_codes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clearip.ctl.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for line in ("0  done", "1  the daemon", "2  invalid input", "3  the daemon is not running"):
        assert line in result.stdout


def test_trust_commands_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    added = ctl(
        tmp_path, "trust", "add", "198.51.100.0/24", "--role", "provider", "--note", "carrier B",
        socket_path=daemon.socket,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "daemon not running" not in added.stdout
    assert daemon.policy.trust.role_of("198.51.100.20") is not None  # the relay sees it
    assert "198.51.100.0/24" in daemon.trust_file.read_text()  # and the file has it
    listed = json.loads(ctl(tmp_path, "trust", "list", "--json", socket_path=daemon.socket).stdout)
    assert [e["cidr"] for e in listed] == ["192.0.2.1/32", "198.51.100.0/24"]
    removed = ctl(tmp_path, "trust", "remove", "192.0.2.1", socket_path=daemon.socket)
    assert removed.returncode == 0, removed.stderr
    assert daemon.policy.trust.role_of("192.0.2.1") is None
    exported = ctl(tmp_path, "trust", "export", socket_path=daemon.socket).stdout
    assert exported == daemon.trust_file.read_text()


def test_status_stats_and_emergency_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    status = json.loads(ctl(tmp_path, "status", "--json", socket_path=daemon.socket).stdout)
    assert status["uptime_s"] == 12.5
    assert status["trust_entries"] == 1
    assert status["kernel_filter"] == "off (no kernel headers at /lib/modules/x/build)"
    table = ctl(tmp_path, "status", socket_path=daemon.socket).stdout.splitlines()
    assert table[0].split() == ["WHAT", "VALUE"]
    assert "listeners" in table[2] and "udp:0.0.0.0:5060, tcp:0.0.0.0:5060" in table[2]
    assert any(line.startswith("kernel_filter") and "off (" in line for line in table)
    stats = json.loads(ctl(tmp_path, "stats", "--json", socket_path=daemon.socket).stdout)
    assert stats == {"relay": {"untrusted_dropped": 3}, "kernel": None}

    top = ctl(tmp_path, "top-dropped", socket_path=daemon.socket)
    assert top.returncode == 1 and "kernel filter off" in top.stderr

    assert ctl(tmp_path, "emergency", "add", "112", socket_path=daemon.socket).returncode == 0
    listed = ctl(tmp_path, "emergency", "list", "--json", socket_path=daemon.socket)
    assert json.loads(listed.stdout) == ["112", "911", "933"]
    assert "112" in daemon.policy.emergency
    bad = ctl(tmp_path, "emergency", "add", "91a", socket_path=daemon.socket)
    assert bad.returncode == 2 and "digits only" in bad.stderr
    missing = ctl(tmp_path, "emergency", "remove", "999", socket_path=daemon.socket)
    assert missing.returncode == 2
    assert daemon.policy.emergency.numbers() == ["112", "911", "933"]


def test_tables_fit_a_narrow_terminal(daemon: Daemon, tmp_path: Path) -> None:
    note = "a very long note about this carrier's second interconnect in Frankfurt"
    ctl(tmp_path, "trust", "add", "2001:db8:ffff::/48", "--role", "provider", "--note", note,
        socket_path=daemon.socket)  # fmt: skip
    for columns in (40, 60):
        out = ctl(tmp_path, "trust", "list", socket_path=daemon.socket, columns=columns).stdout
        assert out and all(len(line) <= columns for line in out.splitlines()), out
        assert "2001:db8:ffff::/48" in out  # the short columns are kept whole
        assert "…" in out
    wide = ctl(tmp_path, "trust", "list", socket_path=daemon.socket, columns=200).stdout
    assert note in wide


def test_control_socket_survives_garbage(tmp_path: Path) -> None:
    (tmp_path / "trust.toml").write_text("")
    policy = SourcePolicy(TrustList(), tmp_path / "trust.toml", EmergencyNumbers(), tmp_path)
    path = tmp_path / "c.sock"

    async def main() -> list[dict[str, object]]:
        server = ControlServer(
            str(path), policy, lambda: {"up": True}, lambda: {}, allow_uid=os.getuid()
        )
        await server.start()
        assert path.stat().st_mode & 0o777 == 0o600
        reader, writer = await asyncio.open_unix_connection(str(path))
        replies = []
        for line in (
            b"not json\n",
            b"[1, 2]\n",
            b'{"cmd": "nope"}\n',
            b'{"cmd": "trust.add"}\n',
            b'{"cmd": "trust.add", "cidr": "192.0.2.7", "role": "provider"}\n',
            b'{"cmd": "emergency.add", "number": "112"}\n',
            b'{"cmd": "status"}\n',
            b'{"cmd": "top-dropped", "n": "many"}\n',
            b'{"cmd": "trust.import", "text": 5}\n',
            b"\xff\xfe\n",
            b'{"cmd":"trust.list"}\n',
        ):
            writer.write(line)
            await writer.drain()
            replies.append(json.loads(await reader.readline()))
        writer.close()
        # Over the request limit: refused and closed (the client may see a reset instead).
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(b"x" * (2 << 20) + b"\n")
            await writer.drain()
            replies.append(json.loads(await reader.readline()))
        except ConnectionError:
            replies.append({"ok": False, "error": "too large (reset)"})
        writer.close()
        # The server still answers new clients.
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"cmd": "emergency.list"}\n')
        replies.append(json.loads(await reader.readline()))
        writer.close()
        await server.close()
        return replies

    replies = asyncio.run(main())
    assert [r["ok"] for r in replies] == [
        False, False, False, False, True, True, True, False, False, False, True, False, True,
    ]  # fmt: skip
    assert all(r["kind"] == "invalid" for r in replies[:4])
    assert "known:" in str(replies[2]["error"])
    assert load_trust_file(tmp_path / "trust.toml").role_of("192.0.2.7") is not None
    assert "112" in (tmp_path / "emergency.toml").read_text()
    assert replies[6]["result"] == {
        "up": True,
        "trust_entries": 1,
        "kernel_filter": "off (not started)",
    }
    assert replies[10]["result"] == [{"cidr": "192.0.2.7/32", "role": "provider", "note": ""}]
    assert "too large" in str(replies[11]["error"])
    assert replies[12]["result"] == ["112", "911", "933"]
    assert not path.exists()


@pytest.mark.root
def test_control_socket_refuses_other_users(tmp_path: Path) -> None:
    # A directory the other user can reach (pytest's tmp_path is root's alone).
    tmp_path = Path(tempfile.mkdtemp(prefix="clearipctl-"))
    os.chmod(tmp_path, 0o755)
    (tmp_path / "trust.toml").write_text(ONE_SWITCH)
    running = Daemon(tmp_path)  # root only
    try:
        os.chmod(running.socket, 0o666)  # let the other user reach the peer check itself
        request = b'{"cmd": "trust.add", "cidr": "10.0.0.0/8", "role": "switch"}\n'
        code = (
            "import os, socket; os.setgid(65534); os.setuid(65534); "
            f"s = socket.socket(socket.AF_UNIX); s.connect({str(running.socket)!r}); "
            # The server may answer and close before the request is written: read anyway.
            "import contextlib\n"
            f"with contextlib.suppress(BrokenPipeError): s.sendall({request!r})\n"
            "print(s.recv(4096).decode())"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
    finally:
        running.close()
        trust_text = (tmp_path / "trust.toml").read_text()
        shutil.rmtree(tmp_path)
    assert "permission denied" in result.stdout, result.stderr
    assert "10.0.0.0/8" not in trust_text
