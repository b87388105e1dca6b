"""Redirect: guests use the region's copies of their files. ``agent`` (the
qemu-guest-agent client), ``actions`` (install, redirect, unredirect and status in a
guest, through its agent), ``daemon`` (automatic redirect after each start, serving the
hook's requests) and ``unit`` (the daemon's systemd unit). The guest side is the shell
script in ``libshare/data/guest``."""
