"""A host's supply chain: the hash-pinned lock, real pip refusing other bytes, the SBOM, the audit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL
from typer.testing import CliRunner

from dualtrack.cli import app
from dualtrack.sbom import SBOM_NAME
from dualtrack.wheelhouse import (
    LOCK,
    WheelhouseError,
    audit_input,
    build,
    download,
    pack,
    pins_of,
    read_lock,
    stale,
    write_sbom,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_lock_matches_the_requirements_it_was_resolved_from() -> None:
    pins = read_lock(LOCK)
    assert stale(pins) == [], "run `dualtrack onprem lock` and commit services/requirements.lock"
    assert len(pins) > 50
    assert pins["torch"].version.endswith("+cpu")  # the hosts run no CUDA
    assert all(len(pin.sha256) == 64 and pin.filename.endswith(".whl") for pin in pins.values())


def test_a_stale_lock_is_refused_before_anything_is_downloaded(tmp_path: Path) -> None:
    text = LOCK.read_text(encoding="utf-8")
    numpy = read_lock(LOCK)["numpy"]
    stale_lock = tmp_path / "requirements.lock"
    stale_lock.write_text(text.replace(f"numpy=={numpy.version} ", "numpy==1.25.0 "), encoding="utf-8")
    with pytest.raises(
        WheelhouseError, match=r"numpy: requirements.txt pins ==1\.26\.4, the lock has 1\.25\.0"
    ):
        build(tmp_path / "wheelhouse", stale_lock)
    assert not (tmp_path / "wheelhouse").exists()


def test_a_lock_line_without_a_hash_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "requirements.lock"
    bad.write_text("six==1.17.0\n", encoding="utf-8")
    with pytest.raises(WheelhouseError, match=r"requirements.lock:1: not `name==version --hash=sha256:HEX`"):
        read_lock(bad)


def test_a_lock_line_with_a_second_hash_is_refused(tmp_path: Path) -> None:
    """pip would take either file: one line, one file."""
    bad = tmp_path / "requirements.lock"
    bad.write_text(f"six==1.17.0 --hash=sha256:{'a' * 64} --hash=sha256:{'b' * 64}\n", encoding="utf-8")
    with pytest.raises(WheelhouseError, match=r"requirements.lock:1: not"):
        read_lock(bad)


def test_a_lock_resolved_from_other_requirements_is_stale(tmp_path: Path) -> None:
    """An added, removed or re-extra'd requirement changes the inputs digest the lock records."""
    changed = tmp_path / "requirements.lock"
    text = LOCK.read_text(encoding="utf-8")
    changed.write_text(
        text.replace("# inputs-sha256: ", "# inputs-sha256: 0", 1)[: len(text)], encoding="utf-8"
    )
    problems = stale(read_lock(changed), changed)
    assert problems == ["services/requirements.txt changed since the lock was resolved"]


def test_the_audit_asks_about_public_releases_without_hashes() -> None:
    asked = audit_input(LOCK).splitlines()
    assert "torch==2.13.0" in asked  # a database knows the release, not PyTorch's +cpu build
    assert all("==" in line and "--hash" not in line and "+" not in line for line in asked)
    assert len(asked) == len(read_lock(LOCK))


def test_a_wheel_rebuilt_under_the_same_name_is_packed_again(tmp_path: Path) -> None:
    import tarfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "demo-1.0-py3-none-any.whl"
    wheel.write_bytes(b"first build")
    pack(wheels, tmp_path / "wheels.tar", pins_of(wheels))
    wheel.write_bytes(b"second build")
    pack(wheels, tmp_path / "wheels.tar", pins_of(wheels))
    with tarfile.open(tmp_path / "wheels.tar") as tar:
        assert tar.extractfile(wheel.name).read() == b"second build"


def test_pip_refuses_to_download_bytes_the_lock_does_not_name(tmp_path: Path) -> None:
    forged = tmp_path / "requirements.lock"
    forged.write_text(f"six==1.17.0 --hash=sha256:{'0' * 64}\n", encoding="utf-8")
    with pytest.raises(WheelhouseError, match="DO NOT MATCH THE HASHES"):
        download(forged, tmp_path / "wheels")
    assert not list((tmp_path / "wheels").glob("*.whl"))


def _host_install(venv_dir: Path, wheels: Path, lock: Path) -> subprocess.CompletedProcess[str]:
    """The base role's install command, as it runs on a host."""
    pip = venv_dir / "bin" / "pip"
    argv = [str(pip), "install", "--no-index", "--disable-pip-version-check", "--require-hashes"]
    argv += [f"--find-links={wheels}", f"--requirement={lock}"]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def test_the_host_install_refuses_a_wheel_altered_after_the_build(wheelhouse: Path, tmp_path: Path) -> None:
    """A small, dependency-free slice of the real wheelhouse: one wheel swapped on the way is refused."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (six,) = (wheelhouse / "wheels").glob("six-*.whl")
    shutil.copy2(six, wheels / six.name)
    lock = tmp_path / "requirements.lock"
    lock.write_text(next(p.line() for p in pins_of(wheelhouse / "wheels") if p.name == "six") + "\n")
    venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
    with (wheels / six.name).open("ab") as tampered:
        tampered.write(b"\0")
    refused = _host_install(tmp_path / "venv", wheels, lock)
    assert refused.returncode != 0 and "DO NOT MATCH THE HASHES" in refused.stderr
    shutil.copy2(six, wheels / six.name)
    installed = _host_install(tmp_path / "venv", wheels, lock)
    assert installed.returncode == 0, installed.stderr
    assert "Successfully installed six" in installed.stdout


def test_the_wheelhouse_holds_exactly_the_locked_files_and_an_sbom_of_them(wheelhouse: Path) -> None:
    pins = read_lock(wheelhouse / "requirements.lock")
    assert {p.name: p for p in pins_of(wheelhouse / "wheels")} == pins
    assert not (wheelhouse / "requirements.txt").exists()  # nothing unpinned is shipped
    (project,) = read_lock(wheelhouse / "project" / "requirements.lock").values()
    assert {p.name: p for p in pins_of(wheelhouse / "project")} == {"dualtrack": project}
    document = (wheelhouse / SBOM_NAME).read_text(encoding="utf-8")
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(document) is None
    sbom = json.loads(document)
    components = {c["bom-ref"]: c for c in sbom["components"]}
    llama = read_lock(wheelhouse / "llama" / "requirements.lock") if (wheelhouse / "llama").is_dir() else {}
    for pin in [*pins.values(), *llama.values()]:
        component = components[f"pkg:pypi/{pin.name}@{pin.version}"]
        assert component["hashes"] == [{"alg": "SHA-256", "content": pin.sha256}]
        assert component["purl"] == PackageURL("pypi", name=pin.name, version=pin.version).to_string()
    assert len(components) == len({(p.name, p.version) for p in [*pins.values(), *llama.values()]})
    root = sbom["metadata"]["component"]
    assert root["name"] == "dualtrack"
    graph = {d["ref"]: d.get("dependsOn", []) for d in sbom["dependencies"]}
    assert "pkg:pypi/fastapi@" in " ".join(graph[root["bom-ref"]])
    reached, todo = set(), [root["bom-ref"]]
    while todo:
        ref = todo.pop()
        if ref not in reached:
            reached.add(ref)
            todo += graph.get(ref, [])
    assert reached == set(graph), "every shipped wheel is something the project needs"
    licensed = [c for c in sbom["components"] if c.get("licenses")]
    assert len(licensed) >= 0.9 * len(sbom["components"])
    # the same wheelhouse gives the same document: a playbook re-run has nothing to copy
    before = (wheelhouse / SBOM_NAME).stat().st_mtime_ns
    write_sbom(wheelhouse)
    assert (wheelhouse / SBOM_NAME).read_text(encoding="utf-8") == document
    assert (wheelhouse / SBOM_NAME).stat().st_mtime_ns == before


def test_an_audit_that_cannot_reach_its_database_fails_closed() -> None:
    """pip-audit runs for real; with the database out of reach the audit is a failure, never clean."""
    unreachable = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-m", "dualtrack", "onprem", "audit"],
        capture_output=True,
        text=True,
        env=unreachable,
        cwd=ROOT,
        check=False,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "could not be checked" in done.stderr
    assert "no known vulnerabilities" not in done.stdout


def test_audit_names_the_allowed_databases() -> None:
    result = CliRunner().invoke(app, ["onprem", "audit", "--service", "nvd"])
    assert result.exit_code == 2
    assert "--service 'nvd': choose pypi or osv" in result.output
