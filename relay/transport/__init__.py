"""asyncio transports: UDP, TCP and TLS listeners and connections around the sans-IO stack.

Nothing is imported here: importing ``transport.peer`` (a config type) must not load asyncio.
"""
