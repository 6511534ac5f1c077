"""`python -m userip.cli ...`: the same as the `userip` command."""

import sys

from userip.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
