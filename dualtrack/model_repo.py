"""Render and check Triton model repositories from ``model_repo/`` templates and profiles.

``render`` fills the templates of a profile's serving path -- the inflight-batching
ensemble (preprocessing -> tensorrt_llm -> postprocessing) for engine-path profiles,
the LLM-API ``tensorrt_llm`` model (``model.yaml``) for PyTorch-path ones -- with
the profile's numbers, and, for the on-prem role, names the entry model
``local_fallback`` and adds the ``embedding`` model. ``check`` validates any
repository: every ``config.pbtxt`` parses with Triton's own ``ModelConfig``
protobuf, no ``${...}`` is left, ensemble steps are wired consistently (every
mapped tensor exists in the step's model with a matching dtype and shape), and
batch/instance/streaming settings agree with the profile the repository was
rendered from (``dualtrack-profile.json``), and the repository holds models only: a
tokenizer or checkpoint directory inside it would make Triton exit at start-up
(:mod:`infra.model_layout` puts them beside it).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from infra import model_layout
from infra.catalog import ModelProfile, model_profiles

TEMPLATES = Path(__file__).resolve().parent.parent / "model_repo"
ENGINE_MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble")
PROFILE_FILE = "dualtrack-profile.json"
VERSION_MARKER = ".dualtrack-version"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
Role = Literal["cloud", "onprem"]
ENTRY_MODEL = {"cloud": "ensemble", "onprem": "local_fallback"}
"""The model a client calls (text in, text out) in each role."""


class ModelRepoError(ValueError):
    """A template or repository problem; the message names the file and what is wrong."""


@dataclass(frozen=True)
class RenderOptions:
    role: Role = "cloud"
    runtime_root: str = model_layout.POD_ROOT
    """Where one version's layout lives when Triton runs: the repository is ``<root>/repository``,
    the tokenizer, engines and checkpoint sit beside it (the cloud pod sees it at /models)."""
    tokenizer_dir: str | None = None
    checkpoint_dir: str | None = None
    engine_dir: str | None = None
    """Where the TensorRT-LLM engines are, when not ``<root>/engines``."""
    embedding_model: str = "packaged:all-MiniLM-L6-v2"
    embedding_dim: int = 384


def entry_model(role: Role) -> str:
    return ENTRY_MODEL[role]


class ClientCall(NamedTuple):
    model: str
    inputs: str
    reasoning: bool


def client_call(profile_name: str, role: Role = "cloud") -> ClientCall:
    """What a client of a repository rendered for this profile calls: the model, its input
    style, and whether it reasons.

    The engine path answers on the ensemble with the ensemble's inputs; the PyTorch path's
    entry model in the cloud is the LLM-API ``tensorrt_llm`` itself, with its own inputs.
    The gateway settings ``llm.<endpoint>.model`` / ``triton_inputs`` / ``reasoning`` take
    these values.
    """
    profiles = model_profiles()
    if profile_name not in profiles:
        raise ModelRepoError(f"unknown profile {profile_name!r}; allowed: {', '.join(sorted(profiles))}")
    profile = profiles[profile_name]
    if profile.path == "pytorch":
        model = "tensorrt_llm" if role == "cloud" else entry_model(role)
        return ClientCall(model, "llmapi", profile.reasoning)
    return ClientCall(entry_model(role), "ensemble", profile.reasoning)


def _variables(profile: ModelProfile, opts: RenderOptions, tp: int) -> dict[str, str]:
    root = opts.runtime_root.rstrip("/")
    tokenizer = opts.tokenizer_dir or (
        profile.tokenizer_dir if profile.tokenizer_dir.startswith("/") else f"{root}/{profile.tokenizer_dir}"
    )
    # the PyTorch path is one text-in/text-out model: it is the entry model itself
    name = "tensorrt_llm" if profile.path == "pytorch" and opts.role == "cloud" else entry_model(opts.role)
    return {
        "ensemble_name": name,
        "model_id": profile.model_id,
        "checkpoint_dir": opts.checkpoint_dir or f"{root}/{model_layout.CHECKPOINT}",
        "triton_max_batch_size": str(profile.max_batch_size),
        "decoupled_mode": "true" if profile.decoupled else "false",
        "engine_dir": opts.engine_dir or f"{root}/{model_layout.ENGINES}",
        "tokenizer_dir": tokenizer,
        "batching_strategy": profile.batching_strategy,
        "max_queue_delay_microseconds": str(profile.max_queue_delay_microseconds),
        "kv_cache_free_gpu_mem_fraction": str(profile.kv_cache_free_gpu_mem_fraction),
        "kv_cache_dtype": profile.kv_cache_dtype,
        "logits_datatype": profile.logits_datatype,
        "preprocessing_instance_count": str(profile.preprocessing_instances),
        "postprocessing_instance_count": str(profile.postprocessing_instances),
        "max_input_len": str(profile.max_input_len),
        "max_output_len": str(profile.max_output_len),
        "max_seq_len": str(profile.max_input_len + profile.max_output_len),
        "max_num_tokens": str(profile.max_num_tokens),
        "tensor_parallel_size": str(tp),
        "pipeline_parallel_size": str(profile.pipeline_parallel),
        "expert_parallel_size": str(profile.expert_parallel),
        "embedding_model": opts.embedding_model,
        "embedding_dim": str(opts.embedding_dim),
    }


def _fill(text: str, values: dict[str, str], source: Path) -> str:
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise ModelRepoError(f"{source}: template uses unknown variables {missing}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _copy_filled(src: Path, dst: Path, values: dict[str, str]) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_dir() or path.name == ".gitkeep" or "__pycache__" in path.parts:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".pbtxt", ".yaml"):
            target.write_text(_fill(path.read_text(encoding="utf-8"), values, path), encoding="utf-8")
        else:
            shutil.copy2(path, target)
    version = dst / "1"
    version.mkdir(parents=True, exist_ok=True)
    if not any(version.iterdir()):
        (version / VERSION_MARKER).write_text(
            "Version 1 of this model. S3 keeps no empty directories: this file keeps the version\n"
            "through an upload, or Triton would find no version to load.\n",
            encoding="utf-8",
        )


def render(
    profile_name: str | None,
    out: Path,
    options: RenderOptions | None = None,
    *,
    tensor_parallel: int | None = None,
) -> Path:
    """Write the repository for ``profile_name`` into ``out`` (created; must be empty or absent).

    ``out`` becomes ``<root>/repository`` of the layout: upload it there, the tokenizer to
    ``<root>/tokenizer`` (see :mod:`infra.model_layout`).

    On premises ``profile_name`` may be ``None``: a CPU-only site serves just the
    ``embedding`` model and answers with the cloud or the extractive fallback.
    """
    opts = options or RenderOptions()
    profiles = model_profiles()
    if profile_name is None and opts.role != "onprem":
        raise ModelRepoError("a profile is required for the cloud role")
    if profile_name is not None and profile_name not in profiles:
        raise ModelRepoError(f"unknown profile {profile_name!r}; allowed: {', '.join(sorted(profiles))}")
    if out.exists() and any(out.iterdir()):
        raise ModelRepoError(f"{out} is not empty: render into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    embedding_values = {
        "embedding_model": opts.embedding_model,
        "embedding_dim": str(opts.embedding_dim),
    }
    if opts.role == "onprem":
        _copy_filled(TEMPLATES / "embedding", out / "embedding", embedding_values)
    if profile_name is None:
        return out
    profile = profiles[profile_name]
    tp = tensor_parallel or profile.tensor_parallel
    values = _variables(profile, opts, tp)
    if profile.path == "engine":
        for model in ENGINE_MODELS:
            target = values["ensemble_name"] if model == "ensemble" else model
            _copy_filled(TEMPLATES / "inflight_batcher_llm" / model, out / target, values)
    else:
        _copy_filled(TEMPLATES / "llmapi" / "tensorrt_llm", out / values["ensemble_name"], values)
    record = {
        "profile": profile.model_dump(),
        "role": opts.role,
        "tensor_parallel": tp,
        "entry_model": values["ensemble_name"],
    }
    (out / PROFILE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


# --------------------------------------------------------------------------- check


def _configs(repo: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(repo.glob("*/config.pbtxt")):
        yield path, path.read_text(encoding="utf-8")


def parse_config(path: Path, text: str | None = None) -> model_config_pb2.ModelConfig:
    """Parse with Triton's ModelConfig protobuf; errors carry file:line:column."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8") if text is None else text, config)
    except text_format.ParseError as exc:
        raise ModelRepoError(f"{path}:{exc}") from None
    return config


def _dims(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.dims)


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def _ensemble_problems(name: str, config: Any, models: dict[str, Any], broken: set[str]) -> list[str]:
    problems: list[str] = []
    # tensor name -> (dtype, dims) known so far: the ensemble's inputs, then each step's outputs
    known = {t.name: (t.data_type, _dims(t)) for t in config.input}
    for i, step in enumerate(config.ensemble_scheduling.step):
        where = f"{name}: step {i + 1} ({step.model_name})"
        model = models.get(step.model_name)
        if model is None:
            if step.model_name not in broken:  # a config that does not parse is reported once, itself
                problems.append(f"{where}: no model {step.model_name!r} in the repository")
            known.update({value: (None, ()) for value in step.output_map.values()})
            continue
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"{where}: input_map key {key!r} is not an input of {step.model_name}")
            elif value not in known:
                problems.append(
                    f"{where}: {value!r} is neither an ensemble input nor an earlier step's output"
                )
            elif known[value][0] is not None:
                dtype, dims = known[value]
                target = inputs[key]
                if dtype != target.data_type or not _compatible(dims, _dims(target)):
                    problems.append(
                        f"{where}: {value!r} is {model_config_pb2.DataType.Name(dtype)}{list(dims)} but "
                        f"{step.model_name}.{key} is {model_config_pb2.DataType.Name(target.data_type)}"
                        f"{list(_dims(target))}"
                    )
        required = {n for n, t in inputs.items() if not t.optional}
        for missing in sorted(required - set(step.input_map)):
            problems.append(f"{where}: required input {missing!r} of {step.model_name} is not mapped")
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"{where}: output_map key {key!r} is not an output of {step.model_name}")
            else:
                known[value] = (outputs[key].data_type, _dims(outputs[key]))
    for out in config.output:
        if out.name not in known:
            problems.append(f"{name}: ensemble output {out.name!r} is produced by no step")
        elif known[out.name][0] not in (None, out.data_type):
            problems.append(
                f"{name}: ensemble output {out.name!r} has a different data type than its producer"
            )
    return problems


def _params(config: Any) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _coherence_problems(repo: Path, models: dict[str, Any], record: dict[str, Any]) -> list[str]:
    profile = ModelProfile(**record["profile"])
    problems: list[str] = []
    for name, config in models.items():
        if name == "embedding" or profile.path == "pytorch":  # the LLM API takes it from model.yaml
            continue
        if config.max_batch_size != profile.max_batch_size:
            problems.append(
                f"{name}: max_batch_size {config.max_batch_size} != profile {profile.max_batch_size}"
            )
    entry = models.get(record["entry_model"])
    if entry is None:
        return [*problems, f"entry model {record['entry_model']!r} is missing"]
    if profile.path == "engine":
        trt = models.get("tensorrt_llm")
        if trt is None:
            return [*problems, "tensorrt_llm model is missing"]
        if trt.model_transaction_policy.decoupled != profile.decoupled:
            problems.append(f"tensorrt_llm: decoupled {trt.model_transaction_policy.decoupled} != profile")
        params = _params(trt)
        if (
            float(params.get("kv_cache_free_gpu_mem_fraction", "nan"))
            != profile.kv_cache_free_gpu_mem_fraction
        ):
            problems.append("tensorrt_llm: kv_cache_free_gpu_mem_fraction differs from the profile")
        if params.get("gpt_model_type") != profile.batching_strategy:
            problems.append("tensorrt_llm: gpt_model_type differs from the profile's batching_strategy")
        for model, count in (
            ("preprocessing", profile.preprocessing_instances),
            ("postprocessing", profile.postprocessing_instances),
        ):
            got = sum(g.count for g in models[model].instance_group) if model in models else 0
            if got != count:
                problems.append(f"{model}: {got} instances, profile says {count}")
    else:
        name = record["entry_model"]
        if not (repo / name / "1" / "model.py").is_file():
            problems.append(f"{name}: no 1/model.py (the LLM-API Python model)")
        llm = yaml.safe_load((repo / name / "1" / "model.yaml").read_text(encoding="utf-8")) or {}
        expected = {
            "tensor_parallel_size": record["tensor_parallel"],
            "moe_expert_parallel_size": profile.expert_parallel,
            "pipeline_parallel_size": profile.pipeline_parallel,
            "max_batch_size": profile.max_batch_size,
            "max_input_len": profile.max_input_len,
        }
        for key, value in expected.items():
            if llm.get(key) != value:
                problems.append(f"model.yaml: {key} is {llm.get(key)!r}, profile needs {value}")
        if (llm.get("kv_cache_config") or {}).get("dtype") != profile.kv_cache_dtype:
            problems.append("model.yaml: kv_cache_config.dtype differs from the profile")
        tokens = llm.get("max_num_tokens")
        if (
            isinstance(tokens, int)
            and tokens < profile.max_input_len
            and llm.get("enable_chunked_prefill") is not True
        ):
            problems.append(
                f"model.yaml: max_num_tokens {tokens} < max_input_len {profile.max_input_len} needs "
                "enable_chunked_prefill: true, or long prompts are refused"
            )
        if entry.max_batch_size != 0:
            problems.append(f"{name}: max_batch_size must be 0 (the LLM API batches in flight itself)")
        if entry.model_transaction_policy.decoupled != profile.decoupled:
            problems.append(f"{name}: decoupled {entry.model_transaction_policy.decoupled} != profile")
    return problems


def check(repo: Path) -> list[str]:
    """All problems found in ``repo`` (empty list = valid)."""
    if not repo.is_dir():
        raise ModelRepoError(f"{repo} is not a directory")
    problems: list[str] = []
    models: dict[str, Any] = {}
    broken: set[str] = set()
    for path in sorted(repo.rglob("*")):
        if path.is_file() and path.suffix in (".pbtxt", ".yaml") and "${" in path.read_text(encoding="utf-8"):
            left = sorted(set(PLACEHOLDER.findall(path.read_text(encoding="utf-8"))))
            problems.append(f"{path.relative_to(repo)}: unfilled template variables {left}")
    for path, text in _configs(repo):
        try:
            config = parse_config(path, text)
        except ModelRepoError as exc:
            problems.append(str(exc))
            broken.add(path.parent.name)
            continue
        directory = path.parent.name
        if config.name and config.name != directory:
            problems.append(f"{directory}/config.pbtxt: name {config.name!r} differs from its directory")
        models[directory] = config
    if not models:
        problems.append(f"{repo}: no */config.pbtxt found")
    for path in sorted(p for p in repo.iterdir() if p.is_dir()):
        versions = [v for v in path.iterdir() if v.is_dir() and v.name.isdigit()]
        if (path / "config.pbtxt").is_file() and not any(any(v.iterdir()) for v in versions):
            problems.append(
                f"{path.name}: no version directory with a file in it (1/): Triton would load no "
                "version, and S3 keeps no empty directories"
            )
        if not (path / "config.pbtxt").is_file():
            problems.append(
                f"{path.name}/: not a model (no config.pbtxt): Triton would try to load it and exit; "
                f"a tokenizer, checkpoint or engines belong beside the repository "
                f"({', '.join(model_layout.ARTIFACT_DIRS)}), not inside it"
            )
    for name, config in models.items():
        if config.platform == "ensemble":
            problems += _ensemble_problems(name, config, models, broken)
    record_path = repo / PROFILE_FILE
    if record_path.is_file() and not problems:
        problems += _coherence_problems(repo, models, json.loads(record_path.read_text(encoding="utf-8")))
    return problems
