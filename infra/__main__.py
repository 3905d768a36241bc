"""Pulumi entry point (``Pulumi.yaml``: ``main: infra/``): settings -> components -> outputs."""

import sys
from pathlib import Path

# Pulumi runs this directory as a script; make ``infra`` importable as the package the
# tests and the offline plan import, so both run the same modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.program import main

main()
