"""`python -m gemma2np ...`: the same as the `gemma2np` command (see gemma2np/cli.py)."""
import sys

from .cli import main

sys.exit(main())
