"""``python -m dualtrack``."""

from dualtrack.cli import main

main()
