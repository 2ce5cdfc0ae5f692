"""The sans-IO claim, checked: importing the SIP stack and the proxy core loads no I/O.

``relay/sip/`` and ``relay/proxy/`` take messages and events and return actions; the asyncio
shell around them is the only place that does I/O. An import of asyncio, socket, ssl, selectors
or prometheus_client from them (directly or through a module they use) breaks that, so the
whole of both packages is imported in a fresh interpreter and its modules are listed.
"""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("asyncio", "socket", "_socket", "ssl", "_ssl", "selectors", "prometheus_client",
             "uvloop")  # fmt: skip

PROBE = """
import importlib, json, pkgutil, sys
import clearip.relay.proxy, clearip.relay.sip
for package in (clearip.relay.sip, clearip.relay.proxy):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_the_sans_io_packages_load_no_io_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    loaded = json.loads(out)
    assert "clearip.relay.proxy.core" in loaded  # the probe did import the core
    io = [name for name in loaded if name.split(".")[0] in FORBIDDEN]
    assert io == [], f"importing relay/sip and relay/proxy loaded {io}"
