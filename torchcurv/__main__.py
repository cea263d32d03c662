"""``python -m torchcurv`` runs the command line (see torchcurv.cli)."""

import sys

from torchcurv.cli import main

sys.exit(main())
