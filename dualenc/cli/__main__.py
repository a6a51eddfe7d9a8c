"""``python -m dualenc.cli`` (and ``torchrun -m dualenc.cli``) runs the command line."""

import sys

from dualenc.cli.main import main

sys.exit(main())
