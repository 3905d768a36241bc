"""Grafana dashboards in infra/dashboards: valid JSON that plots series the stack really has."""

from __future__ import annotations

import json
import re

import pytest

from infra.components.observability import DASHBOARDS, RECORDING_RULES

# DCGM exporter's default counters (dcgm-exporter default-counters.csv) the GPU board uses
DCGM_DEFAULT = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_XID_ERRORS",
}
KNOWN = set(RECORDING_RULES) | DCGM_DEFAULT | {"up", "nv_inference_request_success"}
FUNCTIONS = {
    "sum",
    "by",
    "count",
    "rate",
    "avg",
    "max",
    "min",
    "clamp_min",
    "label_values",
    "namespace",
    "pod",
    "model",
    "service",
    "on",
    "without",
}


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.stem)
def test_dashboard_queries_use_known_series(path) -> None:
    board = json.loads(path.read_text(encoding="utf-8"))
    assert board["uid"].startswith("dualtrack-") and board["panels"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    queries = [t["expr"] for p in board["panels"] for t in p["targets"]]
    queries += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    for query in queries:
        names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", re.sub(r'"[^"]*"|\$\w+|\{[^}]*\}', "", query)))
        unknown = names - KNOWN - FUNCTIONS
        assert not unknown, f"{path.name}: {query!r} uses {unknown}"


def test_both_dashboards_ship() -> None:
    assert {p.stem for p in DASHBOARDS.glob("*.json")} == {"triton", "gpu"}
