"""`python -m llama2.cli`: the `llama2` command (as torchrun and the tests start it)."""

import sys

from . import main

sys.exit(main())
