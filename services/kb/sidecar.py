"""Sidecar files: ``<document>.meta.yaml`` (or ``.meta.json``) next to a document.

They let an operator label a file without editing it (a PDF or a Word file has
no front-matter). Recognised keys: ``classification``, ``groups`` and ``users`` (who may read
it), ``doc_id``, ``title``, ``metadata`` (a mapping of scalars).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.kb.access import Acl, AclError
from services.kb.classification import Classification, parse_label
from services.kb.loaders import names

SUFFIXES = (".meta.yaml", ".meta.yml", ".meta.json")
_KEYS = ("classification", "groups", "users", "doc_id", "title", "metadata")


class SidecarError(ValueError):
    """A sidecar exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class Sidecar:
    classification: Classification | None = None
    acl: Acl | None = None
    doc_id: str | None = None
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def is_sidecar(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def read_sidecar(document: Path) -> Sidecar:
    """The sidecar of ``document``, or an empty one when there is none."""
    for suffix in SUFFIXES:
        candidate = document.with_name(document.name + suffix)
        if candidate.is_file():
            return _parse(candidate)
    return Sidecar()


def _parse(path: Path) -> Sidecar:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise SidecarError(f"{path}: cannot read sidecar: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise SidecarError(f"{path}: a sidecar must be a mapping")
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise SidecarError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(_KEYS)}")
    label = None
    if data.get("classification") is not None:
        try:
            label = parse_label(data["classification"], str(path))
        except ValueError as exc:
            raise SidecarError(str(exc)) from None
    acl = None
    if "groups" in data or "users" in data:
        try:
            acl = Acl.of(names(data.get("groups"), "groups"), names(data.get("users"), "users"), str(path))
        except AclError as exc:
            raise SidecarError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SidecarError(f"{path}: metadata must be a mapping")
    return Sidecar(
        classification=label,
        acl=acl,
        doc_id=str(data["doc_id"]) if data.get("doc_id") else None,
        title=str(data["title"]) if data.get("title") else None,
        metadata=metadata,
    )
