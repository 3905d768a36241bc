"""The wheelhouse an on-prem host installs from: no index needed on the host.

On-prem knowledge-base hosts are often cut off from the internet, and a host should
run exactly the bytes this repository was tested with. So the third-party wheels are
pinned by hash in ``services/requirements.lock`` (``dualtrack onprem lock`` writes it:
``services/requirements.txt`` resolved under the pins of ``requirements.txt``, for the
hosts' platform). The controller downloads exactly those files (pip refuses any other
bytes), builds a wheel of this project, and the ``base`` role installs on the host with
``pip --no-index --require-hashes``: a wheel altered between here and the host's venv
is refused there too.

Layout::

    <dir>/wheels/*.whl            third-party wheels
    <dir>/wheels.tar              the same, as one reproducible file (one transfer to a host)
    <dir>/requirements.lock       what to install, every file pinned by sha256
    <dir>/sbom.cdx.json           CycloneDX SBOM of everything below (what a host runs)
    <dir>/project/dualtrack-*.whl this repository (services, dualtrack, infra), built reproducibly
    <dir>/llama/wheels.tar        llama-cpp-python[server] and its dependencies (the llama_local
    <dir>/llama/requirements.lock role's venv), when its portable wheel has been built

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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from dualtrack.archive import reproducible_tar
from dualtrack.sbom import SBOM_NAME, Environment, sbom

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


LOCK = ROOT / "services" / "requirements.lock"
LOCK_PLATFORM = f"CPython {TARGET_PYTHON}, manylinux x86_64"
_LOCK_LINE = re.compile(
    r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+) --hash=sha256:(?P<sha256>[0-9a-f]{64})(\s+#.*)?$"
)
"""One file per line, nothing else: a second ``--hash`` would let pip take either file."""
_LOCKED_AT = re.compile(r"^# locked-at: (\S+)$", re.MULTILINE)
_INPUTS = re.compile(r"^# inputs-sha256: ([0-9a-f]{64})$", re.MULTILINE)
SERVICES_REQUIREMENTS = ROOT / "services" / "requirements.txt"


@dataclass(frozen=True)
class Pin:
    """One locked file: the exact wheel pip may install for a requirement."""

    name: str
    version: str
    sha256: str
    filename: str

    def line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}  # {self.filename}"


def pins_of(wheels: Path) -> list[Pin]:
    """The pins that say "exactly these files" for a directory of wheels."""
    pins = []
    for path in sorted(wheels.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        pins.append(Pin(str(name), str(version), digest(path), path.name))
    return sorted(pins, key=lambda pin: pin.name)


def write_lock(
    pins: list[Pin], path: Path, purpose: str, locked_at: str | None = None, inputs: str | None = None
) -> Path:
    """A pip requirements file with one hash per package (``pip install --require-hashes``)."""
    stamp = locked_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header = [
        f"# {purpose}",
        f"# Every file is pinned by sha256 for {LOCK_PLATFORM}; pip installs no other bytes.",
        f"# locked-at: {stamp}",
        *([f"# inputs-sha256: {inputs}"] if inputs else []),
    ]
    path.write_text("\n".join(header + [pin.line() for pin in pins]) + "\n", encoding="utf-8")
    return path


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a lock file, by canonical package name."""
    pins = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        found = _LOCK_LINE.match(line)
        if found is None:
            raise WheelhouseError(f"{path}:{number}: not `name==version --hash=sha256:HEX`: {line[:120]}")
        filename = line.partition("#")[2].strip()
        pins[str(canonicalize_name(found["name"]))] = Pin(
            str(canonicalize_name(found["name"])), found["version"], found["sha256"], filename
        )
    return pins


def locked_at(path: Path) -> str:
    """When the lock was resolved (its header), e.g. the SBOM's timestamp."""
    found = _LOCKED_AT.search(path.read_text(encoding="utf-8"))
    return found.group(1) if found else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(0))


def _requirements(text: str) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _llama_requirements() -> tuple[Requirement, list[Requirement]]:
    """requirements-llama.txt as (llama-cpp-python itself, the pins of its dependencies)."""
    pins = _requirements((ROOT / "requirements-llama.txt").read_text(encoding="utf-8"))
    (server,) = [r for r in pins if canonicalize_name(r.name) == "llama-cpp-python"]
    return server, [r for r in pins if r is not server]


def audit_input(lock_file: Path) -> str:
    """The lock as a vulnerability database can answer for it: ``name==public-version`` lines
    (databases know releases, not local builds such as torch's ``+cpu``; the hashes are checked
    at download and install, not by the audit)."""
    return "".join(f"{pin.name}=={Version(pin.version).public}\n" for pin in read_lock(lock_file).values())


def inputs_digest() -> str:
    """sha256 of what the lock was resolved from (services/requirements.txt, as requirements): an
    added, removed or re-marked requirement, or a changed extra, makes the lock stale."""
    reqs = sorted(str(r) for r in _requirements(SERVICES_REQUIREMENTS.read_text(encoding="utf-8")))
    return hashlib.sha256("\n".join(reqs).encode()).hexdigest()


def stale(lock: dict[str, Pin], lock_file: Path = LOCK) -> list[str]:
    """Why the lock no longer matches the requirements it was resolved from (empty: it does)."""
    problems = []
    found = _INPUTS.search(lock_file.read_text(encoding="utf-8"))
    if found is None or found.group(1) != inputs_digest():
        problems.append("services/requirements.txt changed since the lock was resolved")
    for req in _requirements(SERVICES_REQUIREMENTS.read_text(encoding="utf-8")):
        if canonicalize_name(req.name) not in lock:
            problems.append(f"{req.name} is required by services/requirements.txt but not locked")
    for req in _requirements((ROOT / "requirements.txt").read_text(encoding="utf-8")):
        pin = lock.get(str(canonicalize_name(req.name)))
        if pin is not None and not req.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"{req.name}: requirements.txt pins {req.specifier}, the lock has {pin.version}")
    return problems


def lock(path: Path = LOCK) -> Path:
    """Resolve the hosts' packages afresh and pin every file by hash (``dualtrack onprem lock``)."""
    _host_platform()
    with tempfile.TemporaryDirectory(prefix="dualtrack-lock-") as tmp:
        work = Path(tmp)
        (work / "constraints.txt").write_text(
            constraints((ROOT / "requirements.txt").read_text(encoding="utf-8")), encoding="utf-8"
        )
        _pip(
            "download",
            "-q",
            "--only-binary=:all:",
            f"--python-version={TARGET_PYTHON}",
            "-r",
            str(SERVICES_REQUIREMENTS),
            "-c",
            str(work / "constraints.txt"),
            "-d",
            str(work / "wheels"),
        )
        purpose = (
            "What an on-prem host installs: services/requirements.txt resolved under requirements.txt's "
            "pins.\n# Written by `dualtrack onprem lock`; do not edit by hand."
        )
        return write_lock(pins_of(work / "wheels"), path, purpose, inputs=inputs_digest())


def _host_platform() -> None:
    """pip resolves platform-specific wheels for the machine it runs on, so the controller must be
    what the hosts are: Linux on x86_64 (every locked package has manylinux wheels)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise WheelhouseError(
            "build the wheelhouse on Linux x86_64 like the hosts "
            f"(this is {sys.platform}/{platform.machine()}): in CI or on a jump host, "
            "then pass --wheelhouse DIR"
        )


def download(lock_file: Path, dest: Path) -> Path:
    """Exactly the files ``lock_file`` names into ``dest``: pip refuses a wheel whose bytes differ."""
    _pip(
        "download",
        "-q",
        "--no-deps",
        "--require-hashes",
        "--only-binary=:all:",
        f"--python-version={TARGET_PYTHON}",
        "-r",
        str(lock_file),
        "-d",
        str(dest),
    )
    return dest


def build(target: Path, lock_file: Path = LOCK) -> Path:
    """Fill ``target`` with exactly the locked wheels (pip's cache makes a refresh quick)."""
    _host_platform()
    problems = stale(read_lock(lock_file), lock_file)
    if problems:
        raise WheelhouseError(
            f"{lock_file.name} is stale ({'; '.join(problems)}): run `dualtrack onprem lock` and commit it"
        )
    target.mkdir(parents=True, exist_ok=True)
    wheels, fresh = target / "wheels", target / "wheels.partial"
    shutil.rmtree(fresh, ignore_errors=True)
    for old in ("requirements.txt", "constraints.txt"):  # the layout before hash pinning
        (target / old).unlink(missing_ok=True)
    download(lock_file, fresh)
    shutil.rmtree(wheels, ignore_errors=True)  # nothing stale: only what the lock names
    fresh.rename(wheels)
    shutil.copy2(lock_file, target / "requirements.lock")
    pack(wheels, target / "wheels.tar", list(read_lock(lock_file).values()))  # pip checked these hashes
    project = build_project_wheel(target / "project")
    (pin,) = pins_of(project.parent)
    write_lock(
        [pin],
        project.parent / "requirements.lock",
        "This project's wheel (installed --no-deps).",
        locked_at(lock_file),
    )
    build_llama(target / "llama", lock_file)
    write_sbom(target)
    return target


def llama_wheels_dir() -> Path:
    """Where ``make`` caches llama-cpp-python's portable wheel (``WHEELHOUSE`` in the Makefile)."""
    return Path(os.environ.get("DUALTRACK_WHEEL_CACHE", Path.home() / ".cache" / "dualtrack" / "wheels"))


def build_llama(target: Path, lock_file: Path = LOCK) -> Path | None:
    """The llama.cpp server's wheels (llama-cpp-python from the local cache, its pinned dependencies
    from the index), or None when its wheel was never built: the llama_local role then says how."""
    cache = llama_wheels_dir()
    if not any(cache.glob("llama_cpp_python-*.whl")):
        shutil.rmtree(target, ignore_errors=True)
        return None
    target.mkdir(parents=True, exist_ok=True)
    (target / "requirements.txt").unlink(missing_ok=True)
    fresh, wheels = target / "wheels.partial", target / "wheels"
    shutil.rmtree(fresh, ignore_errors=True)
    server, dependencies = _llama_requirements()
    # llama-cpp-python from this machine's own build only: no index may substitute a wheel for it
    _pip(
        "download",
        "-q",
        "--no-index",
        "--no-deps",
        f"--find-links={cache}",
        f"llama-cpp-python{server.specifier}",
        "-d",
        str(fresh),
    )
    with tempfile.TemporaryDirectory(prefix="dualtrack-llama-") as tmp:
        rest = Path(tmp) / "requirements.txt"
        rest.write_text("".join(f"{r}\n" for r in dependencies), encoding="utf-8")
        # every dependency is pinned in requirements-llama.txt: exactly those versions, no resolution
        _pip(
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            f"--python-version={TARGET_PYTHON}",
            "-r",
            str(rest),
            "-d",
            str(fresh),
        )
    shutil.rmtree(wheels, ignore_errors=True)
    fresh.rename(wheels)
    # llama-cpp-python's wheel is built on this machine, so its hash is known only now: the lock
    # is written here, from the files gathered, and the host installs exactly those
    purpose = "The llama_local role's venv: requirements-llama.txt as gathered for this wheelhouse."
    pins = pins_of(wheels)
    write_lock(pins, target / "requirements.lock", purpose, locked_at(lock_file))
    pack(wheels, target / "wheels.tar", pins)
    return target


def pack(wheels: Path, archive: Path, pins: list[Pin]) -> Path:
    """``wheels/*.whl`` (the files ``pins`` name) as one reproducible tar: one transfer to a host.

    Re-packed unless the pins are the same files (name and sha256) as last time: a wheel rebuilt
    under the same name (llama.cpp's, by ``make``) must not leave the old bytes in the archive.
    """
    listing = archive.with_suffix(".list")
    content = "".join(f"{pin.filename} {pin.sha256}\n" for pin in sorted(pins, key=lambda p: p.filename))
    if archive.is_file() and listing.is_file() and listing.read_text(encoding="utf-8") == content:
        return archive
    reproducible_tar(wheels, archive, "*.whl")
    listing.write_text(content, encoding="utf-8")
    return archive


def write_sbom(target: Path) -> Path:
    """``sbom.cdx.json``: the project wheel, the locked wheels and llama.cpp's venv, when gathered.
    The wheels' hashes come from their locks (pip checked them; no second pass over 600 MB)."""

    def hashes(lock_file: Path) -> dict[str, str]:
        return {pin.filename: pin.sha256 for pin in read_lock(lock_file).values()}

    direct = _requirements(SERVICES_REQUIREMENTS.read_text(encoding="utf-8"))
    environments = [
        Environment(
            "services venv",
            sorted((target / "wheels").glob("*.whl")),
            direct,
            hashes(target / "requirements.lock"),
        )
    ]
    llama = target / "llama"
    if (llama / "wheels").is_dir():
        server, _ = _llama_requirements()  # the rest are its own pins
        wheels = sorted((llama / "wheels").glob("*.whl"))
        environments.append(
            Environment("llama.cpp venv", wheels, [server], hashes(llama / "requirements.lock"))
        )
    (project,) = (target / "project").glob("dualtrack-*.whl")
    document = sbom(environments, project, locked_at(target / "requirements.lock"), LOCK_PLATFORM)
    out = target / SBOM_NAME
    if not out.is_file() or out.read_text(encoding="utf-8") != document:
        out.write_text(document, encoding="utf-8")
    return out


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
