"""`python -m mamba_align.cli <command> ...`: the same as `mamba-align <command> ...` (accelerate's ranks run it)."""

import sys

from mamba_align.cli import main

sys.exit(main())
