"""``python -m srbatch`` is the ``srbatch`` command."""

import sys

from srbatch.cli import main

sys.exit(main())
