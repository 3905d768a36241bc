"""Evaluate the pack without the Pulumi engine, in the pack's own virtualenv.

``dualtrack plan`` captures every resource the program declares; this script runs
each rule of :data:`rules.POLICIES` over them exactly as the engine would (resource
policies per resource, stack policies over all) and prints the violations. It runs
with ``infra/policy/venv/bin/python`` -- the environment ``pulumi preview
--policy-pack infra/policy`` uses -- so what is tested is what the engine loads.

stdin:  ``{"cases": {"<name>": [{"type", "name", "urn", "parent", "props"}, ...]}}``
stdout: ``{"<name>": {"<policy>": ["message", ...]}}`` (empty mapping = compliant)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as the engine runs the pack: rules is top-level

from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
)
from rules import POLICIES


def _opts(parent: str | None) -> PolicyResourceOptions:
    return PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [], parent)


def evaluate(resources: list[dict[str, Any]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}

    def reporter(name: str) -> Any:
        return lambda message, urn=None: found.setdefault(name, []).append(message)

    stack = [
        PolicyResource(r["type"], r["props"], r["urn"], r["name"], _opts(r.get("parent")), None, None, [], {})
        for r in resources
    ]
    for policy in POLICIES:
        if isinstance(policy, ResourceValidationPolicy):
            for r in resources:
                args = ResourceValidationArgs(
                    r["type"], r["props"], r["urn"], r["name"], _opts(r.get("parent")), None
                )
                policy.validate(args, reporter(policy.name))
        else:
            policy.validate(StackValidationArgs(stack), reporter(policy.name))
    return found


def main() -> None:
    cases = json.load(sys.stdin)["cases"]
    json.dump({name: evaluate(resources) for name, resources in cases.items()}, sys.stdout)


if __name__ == "__main__":
    main()
