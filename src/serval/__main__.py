"""``python -m serval``: the ``serval`` command."""

import sys

from serval.cli import main

sys.exit(main())
