"""Milvus standalone cannot run here (no container registry): its compose project and Milvus
settings are rendered by Ansible itself and checked for what production depends on."""

from __future__ import annotations

from pathlib import Path

import yaml

from dualtrack.onprem import ANSIBLE_DIR
from tests.onprem.conftest import run_local_playbook

TEMPLATES = ANSIBLE_DIR / "roles" / "milvus" / "templates"


def _render(tmp_path: Path, variables: dict) -> dict[str, str]:
    plays = [
        {"hosts": "localhost", "gather_facts": False, "roles": [{"role": "dualtrack"}], "vars": variables}
    ]
    plays[0]["tasks"] = [
        {
            "name": f"render {name}",
            "ansible.builtin.template": {"src": str(TEMPLATES / f"{name}.j2"), "dest": str(tmp_path / name)},
        }
        for name in ("docker-compose.yml", "user.yaml", "dualtrack-milvus-compose.service")
    ]
    done = run_local_playbook(tmp_path, plays)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return {p.name: p.read_text() for p in tmp_path.iterdir() if p.name != "local-playbook.yml"}


def test_compose_project_for_production(tmp_path: Path) -> None:
    files = _render(
        tmp_path,
        {
            "milvus_mode": "standalone",
            "milvus_image": "milvusdb/milvus:v2.5.14",
            "milvus_etcd_image": "quay.io/coreos/etcd:v3.5.18",
            "milvus_minio_image": "minio/minio:RELEASE.2024-12-18T13-15-44Z",
            "milvus_data_dir": "/var/lib/dualtrack/milvus",
            "milvus_compose_dir": "/opt/dualtrack/milvus",
            "milvus_root_password": "s3cret-root-password",
            "milvus_minio_access_key": "kb-minio",
            "milvus_minio_secret_key": "kb-minio-secret",
            "dualtrack_listen_address": "10.20.0.5",
        },
    )
    compose = yaml.safe_load(files["docker-compose.yml"])
    services = compose["services"]
    assert set(services) == {"etcd", "minio", "standalone"}
    assert all(":" in s["image"] and not s["image"].endswith(":latest") for s in services.values())
    assert services["minio"]["ports"] == ["127.0.0.1:9000:9000"]  # the object store stays on the host
    assert "10.20.0.5:19530:19530" in services["standalone"]["ports"]
    assert all(p.startswith(("10.20.0.5:", "127.0.0.1:")) for p in services["standalone"]["ports"])
    assert services["standalone"]["environment"]["MINIO_SECRET_ACCESS_KEY"] == "kb-minio-secret"
    settings = yaml.safe_load(files["user.yaml"])
    assert settings["common"]["security"]["authorizationEnabled"] is True
    assert settings["common"]["security"]["defaultRootPassword"] == "s3cret-root-password"
    assert "docker compose up -d" in files["dualtrack-milvus-compose.service"]


DIGEST = "@sha256:" + "ab" * 32


def _images(tmp_path: Path, variables: dict) -> tuple[int, str]:
    plays = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars": variables,
            "tasks": [{"ansible.builtin.include_role": {"name": "milvus", "tasks_from": "images"}}],
        }
    ]
    done = run_local_playbook(tmp_path, plays)
    return done.returncode, done.stdout + done.stderr


def test_standalone_refuses_images_not_pinned_by_digest(tmp_path: Path) -> None:
    pinned = {
        "milvus_image": "milvusdb/milvus:v2.5.14" + DIGEST,
        "milvus_etcd_image": "quay.io/coreos/etcd:v3.5.18" + DIGEST,
        "milvus_minio_image": "minio/minio:RELEASE.2024-12-18T13-15-44Z",
    }
    code, output = _images(tmp_path, pinned)
    assert code != 0
    assert "milvus_minio_image is minio/minio:RELEASE.2024-12-18T13-15-44Z: pin it by digest" in output
    assert "milvus_image is" not in output and "milvus_etcd_image is" not in output
    code, output = _images(tmp_path, {"milvus_image": "milvusdb/milvus:v2.5.14"})  # the defaults are tags
    assert code != 0 and "milvus_image is milvusdb/milvus:v2.5.14: pin it by digest" in output
    code, output = _images(tmp_path, {**pinned, "milvus_minio_image": pinned["milvus_minio_image"] + DIGEST})
    assert code == 0, output[-2000:]
    code, output = _images(tmp_path, {"milvus_require_image_digests": False})
    assert code == 0, output[-2000:]
    assert "run by tag, not pinned bytes" in output
