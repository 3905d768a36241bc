"""Time to converge a fresh on-prem host, and to re-run idempotently.

A fresh test host (podman + systemd, the same one the tests use) is converged with
``dualtrack onprem apply`` (``site.yml``), then the same command runs again. Baseline,
measured in the same run against the same host: the read-only ``preflight.yml`` playbook
(fact gathering and a few asserts), i.e. what any Ansible run costs here. Reported: wall
seconds of each phase, the re-run's ``changed`` count (must be 0) and ratios to the baseline.

    PYTHONPATH=. .venv/bin/python benchmarks/onprem_converge.py [--out bench-results/onprem.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dualtrack.wheelhouse import build  # noqa: E402
from tests.onprem import conftest as site_setup  # noqa: E402
from tests.onprem.host import OnPremHost  # noqa: E402


def task_durations(run: Path) -> list[float]:
    """Seconds of each task result that ran on the host (loop items count once per task result),
    from ansible-runner's own event records of the run."""
    durations = []
    for path in run.glob("**/job_events/*.json"):
        event = json.loads(path.read_text(encoding="utf-8"))
        if event.get("event") in ("runner_on_ok", "runner_on_failed"):
            data = event["event_data"]
            if data.get("duration") and not data.get("task_action", "").endswith(
                ("set_fact", "assert", "debug")
            ):
                durations.append(float(data["duration"]))
    return durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()
    site_setup._podman_env_vars()
    work = Path(tempfile.mkdtemp(prefix="dualtrack-bench-onprem-"))
    started = time.perf_counter()
    wheelhouse = build(work / "wheelhouse")
    wheelhouse_s = time.perf_counter() - started
    host = OnPremHost(f"dualtrack-bench-{os.getpid()}").start()
    try:
        site = site_setup.make_site(host, wheelhouse, work)
        phases: dict[str, float] = {}
        for phase, extra in (
            ("baseline_preflight", ("--playbook", "preflight.yml")),
            ("converge", ()),
            ("rerun", ()),
        ):
            t0 = time.perf_counter()
            code, output = site.apply(*extra)
            phases[phase] = time.perf_counter() - t0
            if code != 0:
                print(output[-4000:], file=sys.stderr)
                return 1
        (rerun_host,) = site.summary(site.runs()[-1])["hosts"].values()
        tasks = task_durations(site.runs()[-1])
    finally:
        host.stop()
    base = phases["baseline_preflight"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "wheelhouse_build_s": round(wheelhouse_s, 1),
        **{f"{k}_s": round(v, 1) for k, v in phases.items()},
        "converge_vs_baseline": round(phases["converge"] / base, 1),
        "rerun_vs_baseline": round(phases["rerun"] / base, 1),
        "rerun_changed": rerun_host["changed"],
        # where a re-run's time goes: tasks that ran on the host, each round trips of the connection
        "rerun_host_tasks": len(tasks),
        "rerun_host_task_median_s": round(statistics.median(tasks), 2),
        "rerun_host_tasks_total_s": round(sum(tasks), 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
