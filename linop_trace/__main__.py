"""``python -m linop_trace``: the ``linop-trace`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
