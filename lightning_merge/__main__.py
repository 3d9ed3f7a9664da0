"""``python -m lightning_merge ...`` runs the command line (as ``torchrun -m lightning_merge merge ...`` does on each
rank)."""

import sys

from lightning_merge.cli.commands import main

sys.exit(main())
