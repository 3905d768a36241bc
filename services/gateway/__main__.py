"""``python -m services.gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from services.config import ConfigError, load_settings
from services.gateway.app import create_app


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        app = create_app(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.gateway.host, port=settings.gateway.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
