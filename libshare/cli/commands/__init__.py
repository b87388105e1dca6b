"""Sub-commands of the ``libshare`` command line, one module per command group."""
