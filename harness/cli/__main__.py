"""`python -m harness.cli ...` = `autodeco ...` (e.g. under `accelerate launch -m harness.cli train ...`)."""

import sys

from harness.cli import main

sys.exit(main())
