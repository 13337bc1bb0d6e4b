"""Allow ``python -m dvmrl`` as a synonym for the ``dvmrl`` command."""

import sys

from dvmrl.cli import main

sys.exit(main())
