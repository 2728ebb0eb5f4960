"""`python3 -m tests.natlab --shell`: build a lab by hand (see docs/nat-lab.rst)."""

import sys

from .lab import main

sys.exit(main())
