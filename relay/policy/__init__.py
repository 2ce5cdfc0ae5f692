"""Who may send SIP and which numbers are emergencies: the trust list, the emergency numbers
and the live source policy that changes both (and the kernel filter) at once.

Importing this package imports nothing.
"""
