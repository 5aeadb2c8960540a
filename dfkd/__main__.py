"""``python -m dfkd``: the command line."""
import sys

from dfkd.cli import main

sys.exit(main())
