"""Allow ``python -m dvmrl`` as a synonym for the ``dvmrl`` command."""

import sys

from dvmrl.cli import console_main

sys.exit(console_main())
