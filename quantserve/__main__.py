"""`python -m quantserve` runs the `quantserve` command."""

import sys

from quantserve.cli import main

sys.exit(main())
