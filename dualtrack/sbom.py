"""A CycloneDX SBOM of a wheelhouse: every package an on-prem host runs, by exact file.

Written with each wheelhouse (``sbom.cdx.json``) and copied to the host beside it, so a
security team can answer "does any site run X?" from the document, and feed it to a
scanner (``dualtrack onprem audit`` runs pip-audit on the same pins). Each component is
one wheel: name, version, ``pkg:pypi`` purl, the sha256 the host's pip checks, and the
licence the wheel declares. Dependencies are the wheels' own ``Requires-Dist``, evaluated
for the hosts' platform. The document is deterministic (serial number from the content,
timestamp from the lock), so an unchanged wheelhouse gives the same bytes and a re-run of
the playbook has nothing to copy.
"""

from __future__ import annotations

import email.parser
import hashlib
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cyclonedx.factory.license import LicenseFactory
from cyclonedx.model import HashAlgorithm, HashType
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HOST_MARKERS = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
"""The environment markers of the hosts (Debian bookworm's CPython on x86_64)."""
SBOM_NAME = "sbom.cdx.json"


@dataclass
class Wheel:
    """What one wheel says about itself."""

    path: Path
    name: str
    version: str
    sha256: str
    license: str | None
    requires: list[Requirement] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, sha256: str | None = None) -> Wheel:
        """``sha256``: the hash a lock already holds for this file (hashing it again is ~1 s per GB)."""
        name, version, _, _ = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as archive:
            # the wheel's own .dist-info sits at the top (some wheels vendor others' below it)
            (metadata,) = [
                n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            ]
            headers = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8", "replace"))
        requires = []
        for raw in headers.get_all("Requires-Dist") or []:
            try:
                requires.append(Requirement(raw))
            except InvalidRequirement:
                continue  # an unparsable line in someone's metadata is not ours to fail on
        if sha256 is None:
            digest = hashlib.sha256()
            with path.open("rb") as data:
                for block in iter(lambda: data.read(1 << 20), b""):
                    digest.update(block)
            sha256 = digest.hexdigest()
        return cls(path, str(name), str(version), sha256, _license(headers), requires)


def _license(headers: email.message.Message) -> str | None:
    """PEP 639's expression, else a short ``License`` field, else the trove classifier."""
    if headers.get("License-Expression"):
        return str(headers["License-Expression"]).strip()
    text = str(headers.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80 and text.upper() != "UNKNOWN":
        return text
    for classifier in headers.get_all("Classifier") or []:
        if classifier.startswith("License :: ") and classifier.count("::") >= 2:
            return classifier.rsplit("::", 1)[1].strip()
    return None


def _wanted(req: Requirement, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**HOST_MARKERS, "extra": extra}) for extra in ("", *extras))


@dataclass
class Environment:
    """One virtualenv on the host: the wheels it installs and what is asked of it directly."""

    name: str
    wheels: list[Path]
    direct: list[Requirement]
    hashes: dict[str, str] = field(default_factory=dict)
    """sha256 by file name, where a lock already holds it."""


def _component(wheel: Wheel, licenses: LicenseFactory, environment: str) -> Component:
    key = str(canonicalize_name(wheel.name))
    return Component(
        type=ComponentType.LIBRARY,
        name=key,
        version=wheel.version,
        bom_ref=f"pkg:pypi/{key}@{wheel.version}",
        purl=PackageURL("pypi", name=key, version=wheel.version),
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=wheel.sha256)],
        licenses=[licenses.make_from_string(wheel.license)] if wheel.license else [],
        description=f"{wheel.path.name} ({environment})",
    )


def _extras(read: dict[str, Wheel], requested: dict[str, Requirement]) -> dict[str, set[str]]:
    """The extras each package is installed with: those asked for directly, and those its
    dependants ask for (``smart-open[http]`` brings in ``requests``), to a fixed point."""
    extras = {name: set(req.extras) for name, req in requested.items()}
    grew = True
    while grew:
        grew = False
        for key, wheel in read.items():
            for req in wheel.requires:
                name = str(canonicalize_name(req.name))
                if (
                    req.extras
                    and _wanted(req, extras.get(key, ()))
                    and not req.extras <= extras.get(name, set())
                ):
                    extras.setdefault(name, set()).update(req.extras)
                    grew = True
    return extras


def sbom(environments: list[Environment], project: Path, timestamp: str, platform: str) -> str:
    """The CycloneDX 1.6 JSON document of ``project`` (the root) and every environment's wheels.

    A package at one version is one component however many environments install it; each
    environment's dependency edges are resolved among its own wheels (its venv is separate).
    """
    root_wheel = Wheel.read(project)
    licenses = LicenseFactory()
    root = Component(
        type=ComponentType.APPLICATION,
        name=root_wheel.name,
        version=root_wheel.version,
        bom_ref=f"pkg:pypi/{root_wheel.name}@{root_wheel.version}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=root_wheel.sha256)],
        description=f"{root_wheel.path.name}, as installed on on-prem hosts ({platform})",
    )
    components: dict[str, Component] = {}
    edges: dict[str, set[str]] = {}
    direct: list[str] = []
    hashes = [root_wheel.sha256]
    for environment in environments:
        wheels = [Wheel.read(path, environment.hashes.get(path.name)) for path in sorted(environment.wheels)]
        read = {str(canonicalize_name(w.name)): w for w in wheels}
        here = {}
        for key, wheel in read.items():
            component = _component(wheel, licenses, environment.name)
            here[key] = components.setdefault(str(component.bom_ref), component)
            hashes.append(wheel.sha256)
        requested = {str(canonicalize_name(r.name)): r for r in environment.direct}
        direct += [str(here[n].bom_ref) for n in requested if n in here]
        extras = _extras(read, requested)
        for key, wheel in read.items():
            needs = {
                str(canonicalize_name(r.name)) for r in wheel.requires if _wanted(r, extras.get(key, ()))
            }
            ref = str(here[key].bom_ref)
            edges.setdefault(ref, set()).update(str(here[n].bom_ref) for n in needs & set(here) if n != key)
            if environment.name not in str(here[key].description):  # one package, several venvs
                here[key].description = f"{here[key].description[:-1]}, {environment.name})"
    content = "\n".join(sorted(hashes))
    bom = Bom(serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"dualtrack-sbom:{content}"))
    bom.metadata.timestamp = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    bom.metadata.component = root
    for component in components.values():
        bom.components.add(component)
    bom.register_dependency(root, [components[ref] for ref in dict.fromkeys(direct)])
    for ref, needs in edges.items():
        bom.register_dependency(components[ref], [components[n] for n in sorted(needs)])
    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"
