"""``python -m services.sync [run|rewind]``: the knowledge-sync consumer (the kb_sync unit runs
``run``; the restore playbook runs ``rewind`` while the consumer is stopped)."""

from __future__ import annotations

import argparse
import logging
import sys

from services.config import ConfigError, load_settings
from services.kb.errors import KBError
from services.sync import runner
from services.sync.consumer import rewind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["run", "rewind"], default="run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        if args.command == "rewind":
            pending = rewind(settings)
            print(
                f"group {settings.sync.group_id} rewound: "
                + (", ".join(f"{t}: {n} events to re-read" for t, n in pending.items()) or "no topics yet")
            )
        else:
            runner.run(settings)
    except (ConfigError, KBError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
