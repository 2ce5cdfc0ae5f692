"""Writes a man page from a command's argparse parser (its ``--help``, subcommands included).

Usage: ``python mkman.py MODULE PROG SECTION VERSION DATE OUT``, where ``MODULE`` has a
``build_parser()`` returning the command's ``argparse.ArgumentParser``. The page holds the
command's description, then each subcommand's own ``--help`` text, so it says no more and no
less than the program does. The RPM build runs it against the installed tree.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def roff_text(text: str) -> str:
    """Escapes plain text for roff: backslashes, and dots or quotes that start a line."""
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def roff_name(name: str) -> str:
    """A command name with its hyphens as roff wants them (not typeset as a minus sign)."""
    return name.replace("-", "\\-")


def literal(text: str) -> str:
    """A block shown as is (help text is laid out already)."""
    return ".nf\n" + roff_text(text.rstrip()) + "\n.fi\n"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.extend(action.choices.items())
    return found


def render(
    parser: argparse.ArgumentParser, prog: str, section: str, version: str, date: str
) -> str:
    description = parser.description or prog
    parts = [
        f'.TH {prog.upper()} {section} "{date}" "{prog} {version}" "clearip-inline-proxy"\n',
        ".SH NAME\n",
        f"{roff_name(prog)} \\- {roff_text(description.rstrip('.'))}\n",
        ".SH SYNOPSIS\n",
        literal(parser.format_usage().removeprefix("usage: ")),
        ".SH DESCRIPTION\n",
        literal(parser.format_help()),
    ]
    subs = subcommands(parser)
    if subs:
        parts.append(".SH COMMANDS\n")
        for name, sub in subs:
            parts.append(f".SS {name}\n")
            parts.append(literal(sub.format_help()))
    parts += [
        ".SH FILES\n",
        ".TP\n/etc/clearip\\-proxy/proxy.toml\nthe daemon's configuration\n",
        ".TP\n/etc/clearip\\-proxy/trust.toml\nthe trust list (sources allowed to send SIP)\n",
        ".TP\n/var/lib/clearip\\-proxy\nstate\n",
        ".SH SEE ALSO\n",
    ]
    for other in ("clearip-proxy", "clearipctl"):
        if other != prog:
            parts.append(".BR " + roff_name(other) + " (8),\n")
    parts.append(".BR systemctl (1)\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    for name in ("module", "prog", "section", "version", "date", "out"):
        args.add_argument(name)
    opts = args.parse_args(argv)
    parser = importlib.import_module(opts.module).build_parser()
    parser.prog = opts.prog
    # A fixed width so the page does not depend on the terminal rpmbuild runs in.
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=78)
    for _, sub in subcommands(parser):
        sub.formatter_class = parser.formatter_class
    page = render(parser, opts.prog, opts.section, opts.version, opts.date)
    Path(opts.out).write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
