"""``python -m breakglass``."""

import sys

from breakglass.cli import main

sys.exit(main())
