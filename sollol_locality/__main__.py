"""``python -m sollol_locality`` runs the ``sollol-locality`` command."""

import sys

from .cli import main

sys.exit(main())
