"""`python -m examples.demo` (from the repository root): see keybatch_demo."""

import sys

from .keybatch_demo import main

sys.exit(main())
