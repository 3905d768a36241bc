"""Settings come from env and TOML; every mistake names key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import PACKAGED_MODEL, ConfigError, load_settings


def test_defaults_are_safe() -> None:
    s = load_settings()
    assert s.gateway.host == "127.0.0.1" and s.gateway.auth_enabled
    assert s.embedding.model == PACKAGED_MODEL
    assert s.milvus.index.type == "HNSW" and s.milvus.index.hnsw_ef_construction == 200


def test_env_and_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "dualtrack.toml"
    cfg.write_text(
        '[milvus]\nuri = "http://127.0.0.1:29530"\n[milvus.index]\ntype = "IVF_FLAT"\nivf_nlist = 64\n'
        '[[classification.path_rules]]\npattern = "confidential/*"\nclassification = "confidential"\n'
    )
    monkeypatch.setenv("DUALTRACK_CONFIG", str(cfg))
    monkeypatch.setenv("DUALTRACK_RETRIEVAL__TOP_K", "7")
    s = load_settings()
    assert s.milvus.uri == "http://127.0.0.1:29530" and s.milvus.index.ivf_nlist == 64
    assert s.retrieval.top_k == 7
    assert s.classification.rules()[0].pattern == "confidential/*"
    monkeypatch.setenv("DUALTRACK_MILVUS__INDEX__TYPE", "HNSW")  # env beats the file
    assert load_settings().milvus.index.type == "HNSW"


@pytest.mark.parametrize(
    ("env", "value", "needles"),
    [
        (
            "DUALTRACK_MILVUS__INDEX__TYPE",
            "IVF_PQ",
            ["milvus.index.type = 'IVF_PQ'", "'HNSW', 'IVF_FLAT' or 'FLAT'"],
        ),
        (
            "DUALTRACK_MILVUS__INDEX__HNSW_M",
            "1000",
            ["milvus.index.hnsw_m = '1000'", "less than or equal to 64"],
        ),
        (
            "DUALTRACK_MILVUS__COLLECTION",
            "kb-1; drop",
            ["milvus.collection = 'kb-1; drop'", "letters, digits and _"],
        ),
        ("DUALTRACK_MILVUS__URI", "ftp://x", ["milvus.uri = 'ftp://x'", "http://"]),
        ("DUALTRACK_GATEWAY__PORT", "99999", ["gateway.port = '99999'", "65535"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needles: list[str]
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    for needle in needles:
        assert needle in str(info.value)
    assert env in str(info.value)


def test_uri_credentials_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALTRACK_MILVUS__URI", "ftp://root:Milvus-s3cret@db.internal:19530")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "milvus.uri" in str(info.value) and "s3cret" not in str(info.value)


def test_secret_values_are_not_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[milvus]\ntoken = ["s3cr3t-token"]\n')
    monkeypatch.setenv("DUALTRACK_CONFIG", str(cfg))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "milvus.token" in str(info.value) and "s3cr3t-token" not in str(info.value)


def test_a_section_wide_error_masks_the_secrets_in_the_section() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(gateway={"host": "0.0.0.0", "api_key": "SUPER-SECRET-KEY-123"})
    assert "gateway.tls_cert_file" in str(info.value) and "SUPER-SECRET-KEY-123" not in str(info.value)


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DUALTRACK_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml: file not found"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("broken.toml", "[milvus\nuri=", "broken.toml: cannot read settings"),
        ("typo.toml", "[milvus]\nurl = 'http://127.0.0.1:1'\n", "milvus.url"),
    ],
)
def test_bad_config_files_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, text: str, needle: str
) -> None:
    cfg = tmp_path / name
    cfg.write_text(text)
    monkeypatch.setenv("DUALTRACK_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match=needle):
        load_settings()


def test_example_config_file_loads(monkeypatch) -> None:
    """dualtrack.example.toml documents every section; it must stay valid."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "dualtrack.example.toml"
    monkeypatch.setenv("DUALTRACK_CONFIG", str(example))
    settings = load_settings()
    assert settings.llm.routing.cloud_classifications == ["public", "internal"]
    assert settings.llm.cloud is None and settings.llm.breaker.failure_threshold == 3


def test_llm_endpoint_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(llm={"cloud": {"url": "ftp://nope", "kind": "grpc"}})
    message = str(info.value)
    assert "llm.cloud.url = 'ftp://nope'" in message and "'triton' or 'openai'" in message
