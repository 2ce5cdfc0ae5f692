"""``python -m clearip.relay.emulator``: same as ``clearip-proxy emulate``."""

import sys

from clearip.relay.emulator.cli import main

sys.exit(main())
