"""A real on-prem test host: a podman container running systemd from a local Debian rootfs.

No registry is reachable, so the image is bootstrapped with ``debootstrap`` (minbase +
systemd, ~50 s once) and cached as a tarball under ``~/.cache/dualtrack`` (or
``DUALTRACK_CACHE``). Podman runs with a private configuration (runc, host network
namespace, ulimits it may set) and private storage, so nothing in /etc changes and
no bridge network is created. Ansible reaches the host through the
``containers.podman.podman`` connection; testinfra through ``podman://NAME``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

IMAGE = "localhost/dualtrack-onprem:bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,iproute2,procps"


def cache_dir() -> Path:
    path = Path(os.environ.get("DUALTRACK_CACHE", Path.home() / ".cache" / "dualtrack"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def podman_env() -> dict[str, str]:
    """Private podman configuration and storage (created on first use)."""
    root = cache_dir() / "podman"
    root.mkdir(exist_ok=True)
    conf, storage = root / "containers.conf", root / "storage.conf"
    if not conf.exists():
        conf.write_text(
            '[containers]\nnetns = "host"\ndefault_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]\n'
            '[engine]\nruntime = "runc"\n',
            encoding="utf-8",
        )
    if not storage.exists():
        storage.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\nrunroot = "{root / "run"}"\n',
            encoding="utf-8",
        )
    return {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, check=check, timeout=timeout
    )


def ensure_image() -> str:
    """The systemd image, imported from the cached rootfs tarball (bootstrapped if missing)."""
    if podman("image", "exists", IMAGE, check=False).returncode == 0:
        return IMAGE
    tarball = cache_dir() / "onprem-bookworm-rootfs.tar"
    if not tarball.exists():
        rootfs = cache_dir() / "rootfs-build"
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(rootfs)],
            check=True,
            capture_output=True,
            timeout=900,
        )
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
        partial.rename(tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    with tarball.open("rb") as data:
        subprocess.run(
            ["podman", "import", "--change", 'CMD ["/sbin/init"]', "-", IMAGE],
            stdin=data,
            env=podman_env(),
            check=True,
            capture_output=True,
            timeout=300,
        )
    return IMAGE


class OnPremHost:
    """One systemd container; ``inventory()`` is what Ansible needs to reach it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, timeout_s: float = 60) -> OnPremHost:
        podman("rm", "-f", self.name, check=False)
        podman(
            "run",
            "-d",
            "--systemd=always",
            "--name",
            self.name,
            "--hostname",
            self.name,
            ensure_image(),
            "/sbin/init",
        )
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.exec("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"systemd in {self.name} is {state!r} after {timeout_s}s")

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, check=check)

    def stop(self) -> None:
        podman("rm", "-f", "-t", "2", self.name, check=False)

    def inventory(self) -> dict:
        return {
            "all": {
                "hosts": {
                    self.name: {
                        "ansible_connection": "containers.podman.podman",
                        "ansible_python_interpreter": "/usr/bin/python3",
                    }
                }
            }
        }
