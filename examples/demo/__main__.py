"""``python -m keybatch.demo``: see :mod:`keybatch.demo`."""

import sys

from ._cli import main

sys.exit(main())
