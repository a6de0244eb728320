"""``python -m robustkd`` runs the command line."""

import sys

from robustkd.cli import main

sys.exit(main())
