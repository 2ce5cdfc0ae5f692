"""Lab tools shipped with the product: the ClearIP emulator, the demo and a throw-away CA.

Never on a production call path; ``clearip-proxy emulate`` and ``clearip-proxy demo`` use them.
Importing this package imports nothing.
"""
