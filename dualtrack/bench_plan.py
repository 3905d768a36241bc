"""``dualtrack bench plan``: how long the mocked Pulumi run of each stack takes.

Each stack runs in a fresh Python process (what ``dualtrack plan`` and the tests
pay, SDK imports included: *cold*) and then again in-process (*warm*: the
program alone). Baseline, measured in the same run: a fresh process that
imports the same SDK modules and runs an empty program under the same mocks --
the fixed cost no program change can remove. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dualtrack.plan import STACKS

_COLD = """
import time, sys
t = time.perf_counter()
from dualtrack.plan import run_program
plan = run_program(sys.argv[1])
print(time.perf_counter() - t, len(plan.resources))
"""
_BASELINE = """
import time
t = time.perf_counter()
import pulumi, pulumi_docker  # noqa: F401  (the SDK modules the program imports)
import pulumi_aws.cloudwatch, pulumi_aws.ec2, pulumi_aws.ecr, pulumi_aws.eks, pulumi_aws.iam  # noqa: F401
import pulumi_aws.kms, pulumi_aws.msk, pulumi_aws.s3  # noqa: F401
import pulumi_kubernetes.apiextensions, pulumi_kubernetes.apps.v1  # noqa: F401
import pulumi_kubernetes.autoscaling.v2, pulumi_kubernetes.batch.v1  # noqa: F401
import pulumi_kubernetes.core.v1, pulumi_kubernetes.helm.v3  # noqa: F401
import pulumi_kubernetes.networking.v1, pulumi_kubernetes.policy.v1  # noqa: F401
import pulumi_kubernetes.scheduling.v1, pulumi_kubernetes.storage.v1  # noqa: F401
from pulumi.runtime.mocks import MockMonitor
from dualtrack.plan import PlanMocks
pulumi.runtime.set_mocks(PlanMocks("us-east-1", "baseline"), project="dualtrack", stack="baseline",
                         monitor=MockMonitor(PlanMocks("us-east-1", "baseline")))
pulumi.runtime.test(lambda: pulumi.Output.from_input(1))()
print(time.perf_counter() - t, 0)
"""


def _fresh(code: str, *args: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    _inner, count = out.stdout.split()
    return wall, int(count)


def run_plan_bench(console: Console, *, repeat: int = 5, out: Path | None = None) -> dict[str, Any]:
    from dualtrack.plan import run_program

    baseline = statistics.median(_fresh(_BASELINE)[0] for _ in range(repeat))
    rows = []
    for stack in STACKS:
        cold = [_fresh(_COLD, stack) for _ in range(repeat)]
        run_program(stack)  # warm-up: imports and caches
        warm = [run_program(stack).seconds for _ in range(repeat)]
        rows.append(
            {
                "stack": stack,
                "resources": cold[0][1],
                "cold_s": round(statistics.median(w for w, _ in cold), 3),
                "warm_s": round(statistics.median(warm), 3),
            }
        )
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={_cpus()}".strip(),
        "python": platform.python_version(),
        "repeat": repeat,
        "baseline_cold_s": round(baseline, 3),
        "stacks": [{**r, "cold_vs_baseline": round(r["cold_s"] / baseline, 2)} for r in rows],
    }
    table = Table(title=f"mocked Pulumi run (median of {repeat}); baseline: empty program {baseline:.2f} s")
    for col in ("stack", "resources", "cold s", "warm s", "cold / baseline"):
        table.add_column(col, justify="right")
    for r in result["stacks"]:
        table.add_row(
            r["stack"],
            str(r["resources"]),
            f"{r['cold_s']:.2f}",
            f"{r['warm_s']:.2f}",
            f"{r['cold_vs_baseline']:.2f}x",
        )
    console.print(table)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
