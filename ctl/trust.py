"""``clearipctl trust``: the trust list through the running daemon, or in the trust file when
no daemon runs (the change then applies at the next start)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from clearip.ctl.client import EXIT_OK, Client, DaemonDown, answer
from clearip.ctl.output import table
from clearip.relay.policy.trust import (
    TrustEntry,
    TrustError,
    load_trust_file,
    parse_cidr,
    render_trust_file,
    save_trust_file,
    trust_list_from_data,
    trust_list_from_text,
)

DEFAULT_TRUST_FILE = "/etc/clearip-proxy/trust.toml"


def trust(args: argparse.Namespace, client: Client) -> int:
    # Validate locally first so bad input never reaches the daemon or the file.
    if args.action in ("add", "remove"):
        parse_cidr(args.cidr)
    reply: dict[str, Any]
    try:
        if args.action == "list":
            result, code = answer(client.call("trust.list"))
            return code if code else _print_trust(result, args)
        if args.action == "export":
            result, code = answer(client.call("trust.export"))
            if not code:
                print(result, end="")
            return code
        if args.action == "add":
            reply = client.call("trust.add", cidr=args.cidr, role=args.role, note=args.note)
        elif args.action == "remove":
            reply = client.call("trust.remove", cidr=args.cidr)
        else:
            text = _read_import(args.file)
            reply = client.call("trust.import", text=text, origin=args.file)
    except DaemonDown:
        return _trust_offline(args)
    result, code = answer(reply)
    if not code:
        print(result)
    return code


def _trust_offline(args: argparse.Namespace) -> int:
    path = Path(args.trust_file)
    note = f"daemon not running: changed {path} only; it applies at the next start"
    if args.action in ("add", "import") and not path.exists():
        trust = trust_list_from_data({}, str(path))  # the first entry creates the file
    else:
        trust = load_trust_file(path)
    if args.action == "list":
        return _print_trust([entry.as_dict() for entry in trust], args)
    if args.action == "export":
        print(render_trust_file(trust), end="")
        return EXIT_OK
    if args.action == "add":
        trust.add(TrustEntry.parse(args.cidr, args.role, args.note))
    elif args.action == "remove":
        trust.remove(parse_cidr(args.cidr))
    elif args.action == "import":
        trust = trust_list_from_text(_read_import(args.file), args.file)
    save_trust_file(path, trust)
    print(f"{args.action}: done ({note})")
    return EXIT_OK


def _read_import(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"cannot read {path}: {exc}") from None


def _print_trust(entries: list[dict[str, str]], args: argparse.Namespace) -> int:
    if getattr(args, "json", False):
        print(json.dumps(entries, indent=2))
    elif entries:
        print(table([[e["cidr"], e["role"], e["note"]] for e in entries], ["CIDR", "ROLE", "NOTE"]))
    else:
        print("the trust list is empty: no source may send SIP")
    return EXIT_OK
