"""`dualtrack model-repo render|check`: every profile renders to a repository that checks clean,
and each kind of defect is found and named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dualtrack.cli import app
from dualtrack.model_repo import ModelRepoError, RenderOptions, check, parse_config, render
from infra.catalog import model_profiles

runner = CliRunner()
PROFILES = sorted(model_profiles())


@pytest.mark.parametrize("role", ["cloud", "onprem"])
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_renders_and_checks(tmp_path: Path, profile: str, role: str) -> None:
    repo = render(profile, tmp_path / "repo", RenderOptions(role=role))
    assert check(repo) == []
    record = json.loads((repo / "dualtrack-profile.json").read_text())
    models = {p.name for p in repo.iterdir() if p.is_dir()}
    p = model_profiles()[profile]
    if p.path == "engine":
        entry = "ensemble" if role == "cloud" else "local_fallback"
        assert {entry, "preprocessing", "tensorrt_llm", "postprocessing"} <= models
        trt = parse_config(repo / "tensorrt_llm" / "config.pbtxt")
        assert trt.backend == "tensorrtllm" and trt.max_batch_size == p.max_batch_size
        assert trt.model_transaction_policy.decoupled is p.decoupled
        assert trt.parameters["gpt_model_path"].string_value == "/models/engines"  # beside the repository
        assert trt.parameters["kv_cache_free_gpu_mem_fraction"].string_value == str(
            p.kv_cache_free_gpu_mem_fraction
        )
        pre = parse_config(repo / "preprocessing" / "config.pbtxt")
        assert pre.parameters["tokenizer_dir"].string_value == "/models/tokenizer"
        assert pre.instance_group[0].count == p.preprocessing_instances
    else:
        entry = "tensorrt_llm" if role == "cloud" else "local_fallback"
        llm = yaml.safe_load((repo / entry / "1" / "model.yaml").read_text())
        assert (
            llm["tensor_parallel_size"] == p.tensor_parallel
            and llm["moe_expert_parallel_size"] == p.expert_parallel
        )
        assert llm["kv_cache_config"]["dtype"] == p.kv_cache_dtype and llm["backend"] == "pytorch"
        assert llm["model"] == "/models/checkpoint" and llm["tokenizer"] == "/models/tokenizer"
        assert llm["max_input_len"] == p.max_input_len and llm["enable_chunked_prefill"] is True
        assert (repo / entry / "1" / "model.py").is_file()
        config = parse_config(repo / entry / "config.pbtxt")
        assert config.max_batch_size == 0 and config.model_transaction_policy.decoupled is p.decoupled
        assert not config.parameters  # nothing unused
    assert record["entry_model"] == entry and entry in models
    assert ("embedding" in models) is (role == "onprem")
    assert not any("${" in f.read_text() for f in repo.rglob("*") if f.suffix in (".pbtxt", ".yaml"))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return render("deepseek-r1-distill-qwen-7b", tmp_path / "repo")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_syntax_error_names_file_line_and_column(repo: Path) -> None:
    _edit(repo / "postprocessing" / "config.pbtxt", 'backend: "python"', "backend: python python")
    (problem,) = check(repo)
    assert (
        problem.startswith(str(repo / "postprocessing" / "config.pbtxt") + ":")
        and ":" in problem.split("pbtxt:")[1]
    )


def test_unknown_field_is_refused(repo: Path) -> None:
    _edit(repo / "tensorrt_llm" / "config.pbtxt", "max_batch_size:", "max_batch: 1\nmax_batch_size:")
    assert any("max_batch" in p for p in check(repo))


def test_leftover_template_variable(repo: Path) -> None:
    _edit(repo / "preprocessing" / "config.pbtxt", '"/models/tokenizer"', '"${tokenizer_dir}"')
    assert check(repo) == ["preprocessing/config.pbtxt: unfilled template variables ['tokenizer_dir']"]


def test_ensemble_miswired_tensor(repo: Path) -> None:
    _edit(repo / "ensemble" / "config.pbtxt", 'key: "input_lengths"', 'key: "input_length"')
    problems = check(repo)
    assert (
        "ensemble: step 2 (tensorrt_llm): input_map key 'input_length' is not an input of tensorrt_llm"
        in problems
    )
    assert (
        "ensemble: step 2 (tensorrt_llm): required input 'input_lengths' of tensorrt_llm is not mapped"
        in problems
    )


def test_ensemble_dtype_mismatch(repo: Path) -> None:
    _edit(
        repo / "postprocessing" / "config.pbtxt",
        '"TOKENS_BATCH" data_type: TYPE_INT32',
        '"TOKENS_BATCH" data_type: TYPE_INT64',
    )
    (problem,) = check(repo)
    assert (
        "'_TOKENS_BATCH' is TYPE_INT32[-1, -1] but postprocessing.TOKENS_BATCH is TYPE_INT64[-1, -1]"
        in problem
    )


def test_ensemble_shape_mismatch_and_missing_model(repo: Path) -> None:
    _edit(
        repo / "postprocessing" / "config.pbtxt",
        '"SEQUENCE_LENGTH" data_type: TYPE_INT32 dims: [ -1 ]',
        '"SEQUENCE_LENGTH" data_type: TYPE_INT32 dims: [ -1, 2 ]',
    )
    assert any("SEQUENCE_LENGTH" in p and "[-1, 2]" in p for p in check(repo))
    shutil.rmtree(repo / "postprocessing")
    assert "ensemble: step 3 (postprocessing): no model 'postprocessing' in the repository" in check(repo)


def test_incoherent_with_profile(repo: Path) -> None:
    _edit(repo / "postprocessing" / "config.pbtxt", "max_batch_size: 32", "max_batch_size: 8")
    _edit(repo / "tensorrt_llm" / "config.pbtxt", "decoupled: true", "decoupled: false")
    _edit(repo / "preprocessing" / "config.pbtxt", "count: 2", "count: 5")
    problems = check(repo)
    assert "postprocessing: max_batch_size 8 != profile 32" in problems
    assert any(p.startswith("tensorrt_llm: decoupled") for p in problems)
    assert "preprocessing: 5 instances, profile says 2" in problems


def test_llmapi_parallelism_must_match(tmp_path: Path) -> None:
    repo = render("deepseek-r1-671b-fp8", tmp_path / "repo")
    _edit(repo / "tensorrt_llm" / "1" / "model.yaml", "tensor_parallel_size: 8", "tensor_parallel_size: 4")
    assert check(repo) == ["model.yaml: tensor_parallel_size is 4, profile needs 8"]


def test_llmapi_long_prompts_need_chunked_prefill(tmp_path: Path) -> None:
    repo = render("deepseek-r1-671b-fp8", tmp_path / "repo")
    _edit(
        repo / "tensorrt_llm" / "1" / "model.yaml",
        "enable_chunked_prefill: true",
        "enable_chunked_prefill: false",
    )
    assert check(repo) == [
        "model.yaml: max_num_tokens 8192 < max_input_len 32768 needs enable_chunked_prefill: true, "
        "or long prompts are refused"
    ]
    _edit(repo / "tensorrt_llm" / "config.pbtxt", "max_batch_size: 0", "max_batch_size: 64")
    assert "tensorrt_llm: max_batch_size must be 0 (the LLM API batches in flight itself)" in check(repo)


@pytest.mark.parametrize("stray", ["tokenizer", "checkpoint", "engines", "notes"])
def test_non_model_directory_is_refused(repo: Path, stray: str) -> None:
    """Triton loads every directory of the repository as a model and exits on the first that is not."""
    (repo / stray).mkdir()
    (repo / stray / "tokenizer.json").write_text("{}")
    (problem,) = check(repo)
    assert problem.startswith(f"{stray}/: not a model (no config.pbtxt): Triton would try to load it")
    result = runner.invoke(app, ["model-repo", "check", str(repo)])
    assert result.exit_code == 1 and f"{stray}/: not a model" in result.output


def test_every_model_keeps_a_version_through_an_upload(repo: Path) -> None:
    """S3 stores files, not directories: an empty 1/ would vanish on the way to the pod."""
    for model in ("ensemble", "tensorrt_llm"):
        assert any((repo / model / "1").iterdir())
    shutil.rmtree(repo / "ensemble" / "1")
    (repo / "ensemble" / "1").mkdir()
    assert check(repo) == [
        "ensemble: no version directory with a file in it (1/): Triton would load no version, and S3 "
        "keeps no empty directories"
    ]


def test_render_refuses_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ModelRepoError, match="unknown profile 'gpt'; allowed: deepseek"):
        render("gpt", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep me")
    with pytest.raises(ModelRepoError, match="is not empty"):
        render("deepseek-r1-distill-qwen-7b", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "keep me"


def test_cli_render_and_check(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "model-repo",
            "render",
            "-p",
            "deepseek-r1-distill-qwen-7b",
            "-o",
            str(tmp_path / "r"),
            "--role",
            "onprem",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "local_fallback" in result.output and "embedding" in result.output
    assert runner.invoke(app, ["model-repo", "check", str(tmp_path / "r")]).exit_code == 0
    _edit(tmp_path / "r" / "local_fallback" / "config.pbtxt", 'key: "input_ids"', 'key: "ids"')
    result = runner.invoke(app, ["model-repo", "check", str(tmp_path / "r")])
    assert result.exit_code == 1 and "input_map key 'ids'" in result.output
    result = runner.invoke(app, ["model-repo", "render", "-p", "nope", "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "unknown profile" in result.output


@pytest.mark.parametrize(
    "profile, role, expected",
    [
        ("deepseek-r1-671b-fp8", "cloud", ("tensorrt_llm", "llmapi", True)),
        ("deepseek-v3-671b-fp8", "cloud", ("tensorrt_llm", "llmapi", False)),
        ("deepseek-r1-distill-qwen-7b", "onprem", ("local_fallback", "ensemble", True)),
    ],
)
def test_the_client_call_says_whether_the_model_reasons(profile: str, role: str, expected: tuple) -> None:
    from dualtrack.model_repo import client_call

    assert tuple(client_call(profile, role)) == expected  # type: ignore[arg-type]


def test_the_archive_a_role_copies_is_reproducible(tmp_path: Path) -> None:
    """Two renders of the same profile give the same archive bytes (a re-run copies nothing) and it
    unpacks to exactly the rendered files."""
    import tarfile

    archives = []
    for n in (1, 2):
        argv = ["model-repo", "render", "--role", "onprem", "--out", str(tmp_path / f"r{n}")]
        result = CliRunner().invoke(app, [*argv, "--archive", str(tmp_path / f"r{n}.tar")])
        assert result.exit_code == 0, result.output
        archives.append((tmp_path / f"r{n}.tar").read_bytes())
    assert archives[0] == archives[1]
    with tarfile.open(tmp_path / "r1.tar") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
        # every directory level is an entry, so the role sets its owner and mode on unpacking
        assert {m.name for m in tar.getmembers() if m.isdir()} >= {"embedding", "embedding/1"}
    rendered = sorted(
        p.relative_to(tmp_path / "r1").as_posix() for p in (tmp_path / "r1").rglob("*") if p.is_file()
    )
    assert names == rendered and rendered
