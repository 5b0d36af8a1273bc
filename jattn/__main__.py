"""`python -m jattn` is the `jattn` command."""

import sys

from jattn.cli import main

sys.exit(main())
