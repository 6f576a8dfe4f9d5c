"""`python -m cli` (the `edgelearn` command)."""

import sys

from cli import main

sys.exit(main())
