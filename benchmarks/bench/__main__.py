"""``python -m bench``: the bench command, or ``--probe`` (run by memory.probe_in_subprocess)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
