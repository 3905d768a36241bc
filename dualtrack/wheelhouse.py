"""The wheelhouse an on-prem host installs from: no index needed on the host.

On-prem knowledge-base hosts are often cut off from the internet, and a host should
run exactly the versions this repository was tested with. So the controller gathers
every wheel once -- ``services/requirements.txt`` resolved under the pins of
``requirements.txt`` -- plus a wheel of this project, and the ``base`` role copies the
directory to the host and installs with ``pip --no-index``.

Layout::

    <dir>/wheels/*.whl            third-party wheels
    <dir>/wheels.tar              the same, as one reproducible file (one transfer to a host)
    <dir>/requirements.txt        what to install (services/requirements.txt)
    <dir>/constraints.txt         the pins (requirements.txt, extras stripped: pip wants bare names)
    <dir>/project/dualtrack-*.whl this repository (services, dualtrack, infra), built reproducibly
    <dir>/llama/wheels.tar        llama-cpp-python[server] and its dependencies (the llama_local
    <dir>/llama/requirements.txt  role's venv), when its portable wheel has been built

The project wheel is built with a fixed ``SOURCE_DATE_EPOCH``, so the same source gives
the same bytes: the role can tell a code change (new checksum -> reinstall, restart)
from a re-run (nothing to do).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip can hold
PROJECT_SOURCES = ("pyproject.toml", "README.md", "dualtrack", "services", "infra")
TARGET_PYTHON = "3.11.2"
"""The oldest Python the hosts run (Debian bookworm's): wheels are resolved for it, so a package
whose newest release needs a later 3.11 patch level is taken at a version that installs there."""


class WheelhouseError(RuntimeError):
    """pip could not gather a wheel; the message carries pip's own words."""


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise WheelhouseError(f"pip {args[0]} failed:\n{done.stderr.strip()[-2000:]}")


def constraints(requirements: str) -> str:
    """``requirements.txt`` as a constraints file (``pkg[extra]==1`` -> ``pkg==1``)."""
    return re.sub(r"^([A-Za-z0-9_.-]+)\[[^\]]*\]", r"\1", requirements, flags=re.MULTILINE)


def build_project_wheel(out: Path) -> Path:
    """A byte-for-byte reproducible wheel of this repository's packages."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("dualtrack-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="dualtrack-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "venv", "node_modules")
        for name in PROJECT_SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            else:
                shutil.copy2(path, src / name)
        env = {**os.environ, "SOURCE_DATE_EPOCH": REPRODUCIBLE_EPOCH}
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(out), env=env)
    (wheel,) = out.glob("dualtrack-*.whl")
    return wheel


def build(target: Path) -> Path:
    """Fill ``target`` with exactly the wheels the host needs (pip's cache makes a refresh quick).

    pip resolves platform-specific wheels for the machine it runs on, so the controller must
    be what the hosts are: Linux on x86_64 (glibc no newer than the hosts' matters only for
    packages without manylinux wheels; every pinned one has them).
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise WheelhouseError(
            "build the wheelhouse on Linux x86_64 like the hosts "
            f"(this is {sys.platform}/{platform.machine()}): in CI or on a jump host, "
            "then pass --wheelhouse DIR"
        )
    target.mkdir(parents=True, exist_ok=True)
    wheels, fresh = target / "wheels", target / "wheels.partial"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copy2(ROOT / "services" / "requirements.txt", target / "requirements.txt")
    (target / "constraints.txt").write_text(
        constraints((ROOT / "requirements.txt").read_text(encoding="utf-8")), encoding="utf-8"
    )
    _pip(
        "download",
        "-q",
        "--only-binary=:all:",
        f"--python-version={TARGET_PYTHON}",
        "-r",
        str(target / "requirements.txt"),
        "-c",
        str(target / "constraints.txt"),
        "-d",
        str(fresh),
    )
    shutil.rmtree(wheels, ignore_errors=True)  # nothing stale: only what this resolution chose
    fresh.rename(wheels)
    pack(wheels, target / "wheels.tar")
    build_project_wheel(target / "project")
    build_llama(target / "llama")
    return target


def llama_wheels_dir() -> Path:
    """Where ``make`` caches llama-cpp-python's portable wheel (``WHEELHOUSE`` in the Makefile)."""
    return Path(os.environ.get("DUALTRACK_WHEEL_CACHE", Path.home() / ".cache" / "dualtrack" / "wheels"))


def build_llama(target: Path) -> Path | None:
    """The llama.cpp server's wheels (llama-cpp-python from the local cache, the rest from the
    index), or None when its wheel was never built: the llama_local role then says how."""
    cache = llama_wheels_dir()
    if not any(cache.glob("llama_cpp_python-*.whl")):
        shutil.rmtree(target, ignore_errors=True)
        return None
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "requirements-llama.txt", target / "requirements.txt")
    fresh, wheels = target / "wheels.partial", target / "wheels"
    shutil.rmtree(fresh, ignore_errors=True)
    _pip(
        "download",
        "-q",
        "--only-binary=:all:",
        f"--python-version={TARGET_PYTHON}",
        f"--find-links={cache}",
        "-r",
        str(target / "requirements.txt"),
        "-d",
        str(fresh),
    )
    shutil.rmtree(wheels, ignore_errors=True)
    fresh.rename(wheels)
    pack(wheels, target / "wheels.tar")
    return target


def pack(wheels: Path, archive: Path) -> Path:
    """``wheels/*.whl`` as one tar with fixed metadata: same wheels, same bytes.

    Copying one file to a host is far faster than copying a hundred (each is a round trip
    for Ansible), and an unchanged archive is recognised by its checksum and skipped.
    """
    names = sorted(p.name for p in wheels.glob("*.whl"))
    listing = archive.with_suffix(".list")
    if archive.is_file() and listing.is_file() and listing.read_text(encoding="utf-8").split() == names:
        return archive
    partial = archive.with_suffix(".partial")
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in names:
            info = tar.gettarinfo(str(wheels / name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with (wheels / name).open("rb") as data:
                tar.addfile(info, data)
    partial.rename(archive)
    listing.write_text("\n".join(names) + "\n", encoding="utf-8")
    return archive


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
