"""The ``libshare`` command line: ``app`` (the parser, global options, dispatch, exit
codes), ``options`` (options many commands share, declared once), ``output`` (tables
and ``--json``), ``progress`` (progress on stderr) and ``commands/`` (one module per
sub-command, presentation only: the work is done by the subsystems).
"""

from libshare.cli.app import main

__all__ = ["main"]
