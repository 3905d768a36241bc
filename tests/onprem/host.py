"""A real on-prem test host: a podman container running systemd from a local Debian rootfs.

No registry is reachable, so the image is bootstrapped with ``debootstrap`` (minbase +
systemd, ~50 s once) and cached as a tarball under ``~/.cache/dualtrack`` (or
``DUALTRACK_CACHE``). Podman runs with a private configuration (runc, host network
namespace, ulimits it may set) and private storage, so nothing in /etc changes and
no bridge network is created. Ansible reaches the host through the
``containers.podman.podman`` connection; testinfra through ``podman://NAME``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

IMAGE_NAME = "localhost/dualtrack-onprem"
# What a minimal Debian server has plus what the roles install: present in the image because the
# test host has no network (``--network none``), so the roles' package tasks find them installed.
PACKAGES = ",".join(
    (
        "systemd,systemd-sysv,dbus,python3,iproute2,procps",
        "python3-venv,libpython3.11,nftables,curl,ca-certificates,systemd-timesyncd,libgomp1",
    )
)


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
    digest = hashlib.sha256(PACKAGES.encode()).hexdigest()[:12]
    image = f"{IMAGE_NAME}:bookworm-{digest}"
    if podman("image", "exists", image, check=False).returncode == 0:
        return image
    tarball = cache_dir() / f"onprem-bookworm-rootfs-{digest}.tar"
    for stale in cache_dir().glob("onprem-bookworm-rootfs*.tar"):  # an older package list's image
        if stale != tarball:
            stale.unlink()
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
            ["podman", "import", "--change", 'CMD ["/sbin/init"]', "-", image],
            stdin=data,
            env=podman_env(),
            check=True,
            capture_output=True,
            timeout=300,
        )
    return image


class OnPremHost:
    """One systemd container; ``inventory()`` is what Ansible needs to reach it.

    The host gets a network namespace of its own with nothing but loopback
    (``--network none``): its services' ports cannot collide with this machine's and its
    nftables rules stay inside it (``NET_ADMIN`` is granted for them, ``SYS_ADMIN`` so a
    test can add a client namespace behind a veth pair). Ansible and testinfra reach it
    through ``podman exec``. ``volumes`` are read-only bind mounts (``SRC:DST``).
    """

    def __init__(self, name: str, volumes: tuple[str, ...] = ()) -> None:
        self.name = name
        self.volumes = volumes

    def start(self, timeout_s: float = 60) -> OnPremHost:
        podman("rm", "-f", self.name, check=False)
        mounts = [arg for volume in self.volumes for arg in ("--volume", f"{volume}:ro")]
        podman(
            "run",
            "-d",
            "--systemd=always",
            "--network=none",
            "--cap-add=NET_ADMIN,SYS_ADMIN",
            "--shm-size=1g",  # Triton's Python backend exchanges tensors through /dev/shm
            *mounts,
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

    def running(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def copy_in(self, source: Path, target: str) -> None:
        podman("cp", str(source), f"{self.name}:{target}")

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
