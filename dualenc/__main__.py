"""`python -m dualenc` runs the command line."""

import sys

from dualenc.cli import main

sys.exit(main())
