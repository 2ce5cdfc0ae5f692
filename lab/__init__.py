"""The lab: what the tests and the benchmarks both run against, in one place.

Network namespaces and veth pairs (``netns``), real SIPp peers (``sipp``), the relay started as
a process with a generated config (``proxy_harness``), the reliability rigs built from them
(``reliability``) and stopping what was started (``procs``). Neither ``tests/`` nor ``bench/``
imports the other: both import this. Nothing here is part of the product.
"""
