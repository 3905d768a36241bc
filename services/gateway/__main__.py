"""``python -m services.gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import logging
import os
import ssl
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
    gateway = settings.gateway
    tls: dict[str, str] = {}
    for key, path in (("ssl_certfile", gateway.tls_cert_file), ("ssl_keyfile", gateway.tls_key_file)):
        if path is not None:
            setting = "gateway.tls_cert_file" if key == "ssl_certfile" else "gateway.tls_key_file"
            if not os.access(path, os.R_OK):
                print(f"error: {setting} = {str(path)!r} cannot be read by this user", file=sys.stderr)
                return 2
            tls[key] = str(path)
    try:
        uvicorn.run(app, host=gateway.host, port=gateway.port, log_level="info", **tls)
    except ssl.SSLError as exc:
        print(f"error: gateway.tls_cert_file / tls_key_file: {exc.reason or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
