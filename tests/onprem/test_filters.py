"""The roles' filters: CIDRs for the firewall, systemd EnvironmentFile quoting for the env files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

FILTERS = Path(__file__).resolve().parents[2] / "ansible" / "plugins" / "filter"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, FILTERS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


net = _load("dualtrack_net")
systemd = _load("dualtrack_systemd")


def test_split_by_family_and_normalise() -> None:
    cidrs = ["10.20.0.7/16", "fd00::1/64", " 192.168.1.5 "]
    assert net.dualtrack_cidrs(cidrs, 4) == ["10.20.0.0/16", "192.168.1.5/32"]
    assert net.dualtrack_cidrs(cidrs, 6) == ["fd00::/64"]
    assert net.dualtrack_cidrs([], 4) == []


def test_a_malformed_network_is_named() -> None:
    with pytest.raises(AnsibleFilterError, match=r"'10.0.0.300/8' is not an IP network"):
        net.dualtrack_cidrs(["10.0.0.0/8", "10.0.0.300/8"], 4)


def test_membership_for_the_lockout_guard() -> None:
    assert net.dualtrack_in_cidrs("10.1.2.3", ["10.0.0.0/8"])
    assert not net.dualtrack_in_cidrs("192.168.0.1", ["10.0.0.0/8"])
    assert not net.dualtrack_in_cidrs("not-an-ip", ["10.0.0.0/8"])
    assert net.dualtrack_in_cidrs("fd00::5", ["fd00::/64"])


def test_env_values_are_quoted_for_systemd() -> None:
    """systemd unescapes exactly \\ " ` $ inside double quotes; the site tests prove the round trip
    (the test API key carries all four and the gateway accepts it)."""
    assert systemd.systemd_env('a\\b"c$d`e') == '"a\\\\b\\"c\\$d\\`e"'
    assert systemd.systemd_env("trailing  ") == '"trailing  "'
    assert systemd.systemd_env(True) == '"true"' and systemd.systemd_env(8080) == '"8080"'
    with pytest.raises(AnsibleFilterError, match="newline"):
        systemd.systemd_env("two\nlines")
