"""The roles' filters, evaluated by Ansible itself: CIDRs for the firewall, systemd quoting for env files.

Run through ``ansible-playbook`` on localhost, never imported here: importing ``ansible`` patches
``sys.intern`` for the whole process, which breaks torch (and the embedding model) in later tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.onprem.conftest import run_local_playbook

EXPRESSIONS = {
    "v4": "{{ ['10.20.0.7/16', 'fd00::1/64', ' 192.168.1.5 '] | dualtrack_cidrs(4) }}",
    "v6": "{{ ['10.20.0.7/16', 'fd00::1/64'] | dualtrack_cidrs(6) }}",
    "none": "{{ [] | dualtrack_cidrs(4) }}",
    "inside": "{{ '10.1.2.3' | dualtrack_in_cidrs(['10.0.0.0/8']) }}",
    "outside": "{{ '192.168.0.1' | dualtrack_in_cidrs(['10.0.0.0/8']) }}",
    "not_an_ip": "{{ 'not-an-ip' | dualtrack_in_cidrs(['10.0.0.0/8']) }}",
    "inside_v6": "{{ 'fd00::5' | dualtrack_in_cidrs(['fd00::/64']) }}",
    "quoted": "{{ raw | systemd_env }}",
    "spaces": "{{ 'trailing  ' | systemd_env }}",
    "bool": "{{ true | systemd_env }}",
    "number": "{{ 8080 | systemd_env }}",
}


def _playbook(tmp_path: Path, tasks: list[dict]):
    return run_local_playbook(tmp_path, [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}])


def test_filters_as_ansible_evaluates_them(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = _playbook(
        tmp_path,
        [
            {
                "name": "evaluate",
                "ansible.builtin.copy": {"content": "{{ results | to_json }}", "dest": str(out)},
                "vars": {"results": EXPRESSIONS, "raw": 'a\\b"c$d`e'},
            }
        ],
    )
    assert done.returncode == 0, done.stdout[-3000:]
    got = json.loads(out.read_text())
    assert (
        got["v4"] == ["10.20.0.0/16", "192.168.1.5/32"] and got["v6"] == ["fd00::/64"] and got["none"] == []
    )
    assert got["inside"] and got["inside_v6"] and not got["outside"] and not got["not_an_ip"]
    # systemd unescapes exactly \ " ` $ inside double quotes (the site tests prove the round trip:
    # the test API key carries all four and the gateway accepts it)
    assert got["quoted"] == '"a\\\\b\\"c\\$d\\`e"'
    assert got["spaces"] == '"trailing  "' and got["bool"] == '"true"' and got["number"] == '"8080"'


def test_bad_values_are_named(tmp_path: Path) -> None:
    cidr = _playbook(
        tmp_path, [{"ansible.builtin.debug": {"msg": "{{ ['10.0.0.300/8'] | dualtrack_cidrs(4) }}"}}]
    )
    assert cidr.returncode != 0 and "'10.0.0.300/8' is not an IP network" in cidr.stdout
    newline = _playbook(tmp_path, [{"ansible.builtin.debug": {"msg": "{{ 'two\nlines' | systemd_env }}"}}])
    assert newline.returncode != 0 and "cannot contain a newline" in newline.stdout
