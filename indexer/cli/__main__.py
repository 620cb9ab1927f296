"""`python -m indexer.cli`: the `cellatlas` command where its script is not installed."""

import sys

from indexer.cli import main

sys.exit(main())
