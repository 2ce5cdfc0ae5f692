"""clearipctl without a daemon: trust commands on the file, errors exit 2 and change nothing;
with a daemon: the control socket refuses malformed requests without falling over."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from clearip.relay.control import ControlServer
from clearip.relay.emergency import EmergencyNumbers
from clearip.relay.policy import SourcePolicy
from clearip.relay.trust import TrustList, load_trust_file


def ctl(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clearip.ctl.cli",
            "--socket",
            str(tmp / "none.sock"),
            "--trust-file",
            str(tmp / "trust.toml"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_trust_commands_work_on_the_file_when_no_daemon_runs(tmp_path: Path) -> None:
    (tmp_path / "trust.toml").write_text("")
    added = ctl(tmp_path, "trust", "add", "192.0.2.0/24", "--role", "switch", "--note", "core")
    assert added.returncode == 0, added.stderr
    assert "daemon not running" in added.stdout
    assert ctl(tmp_path, "trust", "add", "2001:db8::/32", "--role", "provider").returncode == 0
    listed = json.loads(ctl(tmp_path, "trust", "list", "--json").stdout)
    assert listed == [
        {"cidr": "192.0.2.0/24", "role": "switch", "note": "core"},
        {"cidr": "2001:db8::/32", "role": "provider", "note": ""},
    ]
    table = ctl(tmp_path, "trust", "list").stdout
    assert table.splitlines()[0].split() == ["CIDR", "ROLE", "NOTE"]
    exported = ctl(tmp_path, "trust", "export").stdout
    (tmp_path / "other.toml").write_text(exported)
    assert ctl(tmp_path, "trust", "remove", "192.0.2.0/24").returncode == 0
    assert len(load_trust_file(tmp_path / "trust.toml")) == 1
    assert ctl(tmp_path, "trust", "import", str(tmp_path / "other.toml")).returncode == 0
    assert len(load_trust_file(tmp_path / "trust.toml")) == 2


def test_bad_input_exits_2_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "trust.toml").write_text('[[source]]\ncidr = "192.0.2.1/32"\nrole = "switch"\n')
    before = (tmp_path / "trust.toml").read_text()
    for args, needle in (
        (("trust", "add", "192.0.2.1/32", "--role", "switch"), "already"),
        (("trust", "add", "10.0.0.1/8", "--role", "switch"), "host bits"),
        (("trust", "add", "nonsense", "--role", "switch"), "invalid address"),
        (("trust", "remove", "198.51.100.0/24"), "not in the trust list"),
    ):
        result = ctl(tmp_path, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr
    assert ctl(tmp_path, "trust", "add", "192.0.2.9", "--role", "sbc").returncode == 2
    assert (tmp_path / "trust.toml").read_text() == before


def test_daemon_commands_say_when_the_daemon_is_down(tmp_path: Path) -> None:
    result = ctl(tmp_path, "status")
    assert result.returncode == 3
    assert "not running" in result.stderr


def test_help_documents_exit_codes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clearip.ctl.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "exit codes" in result.stdout and "3  the daemon is not running" in result.stdout


def test_control_socket_is_root_only_and_survives_garbage(tmp_path: Path) -> None:
    (tmp_path / "trust.toml").write_text("")
    policy = SourcePolicy(TrustList(), tmp_path / "trust.toml", EmergencyNumbers(), tmp_path)
    path = tmp_path / "c.sock"

    async def main() -> list[dict[str, object]]:
        server = ControlServer(str(path), policy, lambda: {"up": True}, lambda: {})
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
        ):
            writer.write(line)
            await writer.drain()
            replies.append(json.loads(await reader.readline()))
        writer.close()
        await server.close()
        return replies

    replies = asyncio.run(main())
    assert [r["ok"] for r in replies] == [False, False, False, False, True, True, True]
    assert replies[3]["kind"] == "invalid"
    assert load_trust_file(tmp_path / "trust.toml").role_of("192.0.2.7") is not None
    assert "112" in (tmp_path / "emergency.toml").read_text()
    assert replies[6]["result"] == {"up": True}
    assert not path.exists()
