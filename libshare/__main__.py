"""Allows ``python -m libshare`` as an alias of the ``libshare`` command."""

import sys

from libshare.cli.app import main

sys.exit(main())
