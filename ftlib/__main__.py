"""`python -m ftlib SUBCOMMAND ...`, the same as the `ftlib` console command."""
import sys

from .cli import main

sys.exit(main())
