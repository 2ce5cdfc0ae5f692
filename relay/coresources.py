"""Which sources the compiled core is made from, and a digest of their contents.

Imported by ``relay/__init__.py`` (is the library built in place stale?) and loaded by path
from ``setup.py`` (which records the digest beside the library it builds), so it imports
nothing of the project.
"""

from __future__ import annotations

import hashlib
import os

#: The packages whose modules are compiled.
COMPILED_PACKAGES = ("sip", "proxy")

#: Modules outside those packages on every message's path, compiled too: the UDP socket
#: reader, the effect interpreter and its timer wheel, the emergency-number check.
COMPILED_MODULES = (
    os.path.join("service", "timerwheel.py"),
    os.path.join("service", "dispatch.py"),
    os.path.join("policy", "emergency.py"),
    os.path.join("transport", "udp.py"),
)

#: Beside the library built in place: :func:`core_digest` of the sources it was made from.
DIGEST_FILE = "_core_sources.sha256"


def core_sources(root: str) -> list[str]:
    """The sources mypyc compiles (``__init__.py`` files stay interpreted), sorted."""
    found = []
    for package in COMPILED_PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            found += [
                os.path.join(folder, f) for f in files if f.endswith(".py") and f != "__init__.py"
            ]
    found += [os.path.join(root, module) for module in COMPILED_MODULES]
    return sorted(found)


def core_digest(root: str) -> str:
    """A digest of the compiled sources' contents (names relative to ``root``), written beside
    the library built in place: a checkout or ``touch`` changes times, not contents."""
    digest = hashlib.sha256()
    for path in core_sources(root):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as source:
            digest.update(source.read() + b"\0")
    return digest.hexdigest()
