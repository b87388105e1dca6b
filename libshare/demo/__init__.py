"""The built-in demo (``libshare demo``: ``story``) and the guest kit it and the tests
boot guests with: ``tiny/`` (busybox guests, seconds to boot), ``debian/`` (Debian 12
guests), and what both share (``lifecycle``, ``domain``, ``apt``, ``cache``).

Nothing of the product imports this package; only the ``demo`` command does, when run.
"""
