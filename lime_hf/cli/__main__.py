"""`python -m lime_hf.cli`: the `lime-hf` command."""

import sys

from . import main

sys.exit(main())
