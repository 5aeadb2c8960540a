"""``python -m dfkd`` is the ``dfkd`` command."""
import sys

from dfkd.cli import main

sys.exit(main())
