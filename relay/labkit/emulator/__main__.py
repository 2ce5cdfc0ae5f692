"""``python -m clearip.relay.labkit.emulator``: same as ``clearip-proxy emulate``."""

import sys

from clearip.relay.labkit.emulator.cli import main

sys.exit(main())
