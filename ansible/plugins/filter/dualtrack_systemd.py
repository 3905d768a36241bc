"""``value | systemd_env``: one value for a systemd ``EnvironmentFile=`` line, quoted.

systemd reads env files like a shell: unquoted values lose backslashes and trailing
blanks, and quotes are stripped -- so an API key with a ``\\`` or a JSON setting such as
``{"id": "EMP-\\\\d{6}"}`` would reach the service changed. Inside double quotes it
unescapes exactly ``\\``, ``"``, `````` and ``$``; those are escaped here. Newlines cannot be
represented on one line and are refused.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

_ESCAPED = ("\\", '"', "`", "$")


def systemd_env(value: object) -> str:
    text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    if "\n" in text or "\r" in text:
        raise AnsibleFilterError("an EnvironmentFile value cannot contain a newline")
    for char in _ESCAPED:
        text = text.replace(char, "\\" + char)
    return f'"{text}"'


class FilterModule:
    def filters(self) -> dict:
        return {"systemd_env": systemd_env}
