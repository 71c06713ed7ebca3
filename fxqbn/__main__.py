"""``python -m fxqbn``: the same command as the ``fxqbn`` console script."""

import sys

from .cli import main

sys.exit(main())
