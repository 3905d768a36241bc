"""``python -m services.sync``: run the knowledge-sync consumer (the kb_sync unit)."""

from __future__ import annotations

import logging
import sys

from services.config import ConfigError, load_settings
from services.kb.errors import KBError
from services.sync import runner


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runner.run(load_settings())
    except (ConfigError, KBError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
