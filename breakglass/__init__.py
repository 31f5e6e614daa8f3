"""The ``breakglass`` command: the composition root that wires agent and receiver.

It lives apart from ``agent/`` and ``receiver/`` because it imports both, and
DESIGN.md forbids ``agent`` from importing ``receiver`` (docs/DECISIONS.md).
"""
