"""Replay a rendered pod on real binaries: its containers' commands, with volumes mapped to folders.

What Kubernetes would do for a pod, done here for the parts that can run without a GPU: each
volume becomes a folder under a temporary root (a hostPath is the node's folder, a subPath a
folder inside it), and every mount path in a container's command, arguments and environment
is replaced by the folder that volume maps to. Nothing else in the command changes, so a wrong
flag, path or layout in the program fails here as it would fail in the pod.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import ROOT

AWS_BIN = ROOT / ".venv-aws" / "bin"


def image_python(target: Path, *first: Path) -> Path:
    """A Python environment standing for the serving image's: ``first`` on its path, then ours.

    Triton's Python backend stub ignores ``PYTHONPATH``: its models see the packages of the
    first Python environment on ``PATH``. So where the NGC image has TensorRT-LLM installed,
    the replay puts an environment whose path starts with the test double of it. Returns the
    environment's ``bin`` to put first on Triton's ``PATH``.
    """
    import site
    import venv

    venv.EnvBuilder(with_pip=False).create(target)
    (purelib,) = (target / "lib").glob("python3.*/site-packages")
    entries = [*first, ROOT, *site.getsitepackages()]
    (purelib / "dualtrack-replay.pth").write_text("".join(f"{p}\n" for p in entries))
    return target / "bin"


@dataclass
class Pod:
    """One pod's volumes as folders: ``volumes[name]`` is where that volume lives here."""

    spec: dict[str, Any]
    volumes: dict[str, Path]

    @classmethod
    def of(cls, spec: dict[str, Any], root: Path, host_paths: dict[str, Path]) -> Pod:
        """``host_paths`` maps a hostPath (the node's folder) to the folder standing for it."""
        volumes: dict[str, Path] = {}
        for volume in spec["volumes"]:
            if "hostPath" in volume:
                volumes[volume["name"]] = host_paths[volume["hostPath"]["path"]]
            else:
                volumes[volume["name"]] = root / "volumes" / volume["name"]
                volumes[volume["name"]].mkdir(parents=True, exist_ok=True)
        return cls(spec, volumes)

    def container(self, name: str) -> dict[str, Any]:
        containers = self.spec.get("initContainers", []) + self.spec["containers"]
        (found,) = [c for c in containers if c["name"] == name]
        return found

    def mounts(self, container: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Path]:
        """mountPath -> folder here, for one container (``skip``: mounts left as they are)."""
        mapped = {}
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] in skip:
                continue
            folder = self.volumes[mount["name"]] / mount.get("subPath", "")
            folder.mkdir(parents=True, exist_ok=True)
            mapped[mount["mountPath"]] = folder
        return mapped

    @staticmethod
    def map_text(text: str, mounts: dict[str, Path]) -> str:
        if not mounts:
            return text
        # one pass (a mapped folder is never mapped again); the longest mount path wins
        paths = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        pattern = rf"(?<![\w/.-])({paths})(?=/|\s|$|'|\")"
        return re.sub(pattern, lambda m: str(mounts[m.group(1)]), text)

    def argv(self, container: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
        mounts = self.mounts(container, skip)
        return [
            self.map_text(str(a), mounts) for a in container.get("command", []) + container.get("args", [])
        ]

    def env(
        self, container: dict[str, Any], extra: dict[str, str], skip: tuple[str, ...] = ()
    ) -> dict[str, str]:
        mounts = self.mounts(container, skip)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DUALTRACK_"))}
        env.update({e["name"]: self.map_text(e["value"], mounts) for e in container.get("env", [])})
        env.update(extra)
        return env

    def run(
        self, name: str, extra_env: dict[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run one (init) container's command as rendered; raises with its output when it fails."""
        container = self.container(name)
        env = self.env(container, extra_env)
        env["PATH"] = f"{AWS_BIN}{os.pathsep}{env.get('PATH', '')}"
        result = subprocess.run(
            self.argv(container), env=env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(
                f"container {name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result
