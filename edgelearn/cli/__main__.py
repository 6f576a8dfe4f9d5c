"""`python -m edgelearn.cli`."""

import sys

from edgelearn.cli import main

sys.exit(main())
