"""`python -m harness.cli ...` = `autodeco ...` (e.g. under `accelerate launch -m harness.cli train ...`)."""

import sys

from harness.cli import main

if __name__ == "__main__":  # not when a spawned child process (vLLM's engines) re-imports the main module
    sys.exit(main())
