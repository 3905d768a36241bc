"""Reproducible tar archives: the same files give the same bytes.

What the playbooks copy to a host travels as one archive (a hundred small copies are a
hundred Ansible round trips), and a host knows an unchanged archive by its checksum: so an
archive may depend only on the files' names and contents -- no times, owners or modes of
the controller. Ownership and modes are the role's to set when it unpacks.
"""

from __future__ import annotations

import tarfile
from pathlib import Path


def reproducible_tar(root: Path, archive: Path, pattern: str = "**/*") -> Path:
    """Every file under ``root`` matching ``pattern``, sorted, with fixed metadata; written atomically.

    Directories are entries of their own, so the unpacking side sets owner and mode on every
    level (a tar without them leaves nested directories to the extractor's defaults).
    """
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    dirs = sorted(
        {parent for path in files for parent in path.relative_to(root).parents if parent != Path(".")}
    )
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tar:
        entries = [(root / d, 0o755) for d in dirs] + [(path, 0o644) for path in files]
        for path, mode in sorted(entries, key=lambda e: e[0].relative_to(root).as_posix()):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", mode
            if info.isdir():
                tar.addfile(info)
            else:
                with path.open("rb") as data:
                    tar.addfile(info, data)
    partial.rename(archive)
    return archive
