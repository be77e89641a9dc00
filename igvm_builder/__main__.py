"""``python -m igvm_builder``: the igvm-builder CLI."""

import sys

from igvm_builder.cli import main

sys.exit(main())
