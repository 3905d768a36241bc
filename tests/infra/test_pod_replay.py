"""The serving pod of every stack, replayed on real binaries from the offline plan.

For each Triton Deployment (and, on the engine path, its engine-build Job) the test takes the
rendered objects from the mocked program run and:

1. lays out the model bucket as the upload step and the build Job write it, in a real S3 API
   (moto server) through the real AWS CLI -- the rendered repository, real tokenizer files, a
   checkpoint;
2. runs the Job's containers (fetch checkpoint, upload engines) and the pod's init container
   exactly as rendered, only the S3 endpoint redirected by environment, into folders standing
   for the pod's volumes and the node's NVMe cache -- twice, to show a restart copies nothing;
3. runs the main container's command line as rendered with the real ``tritonserver`` binary
   (ports and listen address made local; only the GPU step is a test double: the CPU
   TensorRT-LLM backend for engines, the TensorRT-LLM LLM-API double for the 671B model, so the
   project's own LLM-API model runs inside Triton), waits for ready and streams an answer.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from dualtrack.plan import Plan
from infra import model_layout as layout
from infra.components.observability import RECORDING_RULES, WAITING_SERIES
from infra.config import load_settings
from services.tritonserver import TritonServer
from tests.infra.replay import AWS_BIN, Pod, image_python
from tests.support import (
    CPU_TRTLLM_BACKEND,
    ROOT,
    close_stream_early,
    free_port,
    offline_tokenizer_dir,
    recorded_calls,
    wait_port,
)

LLMAPI_DOUBLE = ROOT / "tests" / "triton" / "llmapi"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
PROMPT = "Which river flows through Paris? Answer briefly please"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3 API (moto server) on loopback; yields the environment the AWS CLI needs."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(AWS_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, timeout=60)
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _aws(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(AWS_BIN / "aws"), *args],
        env={"PATH": "/usr/bin:/bin", "HOME": env["HOME"], **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _k8s(plan: Plan, kind: str, name: str) -> dict:
    (found,) = [o for o in plan.kubernetes_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _bucket(plan: Plan) -> str:
    (bucket,) = [r for r in plan.of_type("aws:s3/bucket:Bucket") if r.name == "serving-models"]
    return f"{bucket.inputs['bucketPrefix']}plan"


def _upload(stage: Path, profile: str, version: str, model_id: str, path: str, runtime_root: Path) -> None:
    """What an operator's upload step writes, laid out locally (docs/cloud.md, "model bucket")."""
    from typer.testing import CliRunner

    from dualtrack.cli import app

    result = CliRunner().invoke(
        app,
        [
            "model-repo", "render", "-p", profile, "-o", str(stage / layout.REPOSITORY),
            "--runtime-root", str(runtime_root),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tokenizer = Path(offline_tokenizer_dir())
    for target in [stage / layout.TOKENIZER] + ([stage / layout.CHECKPOINT] if path == "pytorch" else []):
        target.mkdir(parents=True)
        for name in TOKENIZER_FILES:
            shutil.copy2(tokenizer / name, target / name)
    if path == "pytorch":
        shutil.copy2(tokenizer / "config.json", stage / layout.CHECKPOINT / "config.json")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


class Replay:
    """One stack's bucket, node and pods; ``serve`` brings one Deployment up on tritonserver."""

    def __init__(self, plan: Plan, root: Path, s3: dict[str, str]) -> None:
        self.plan, self.root = plan, root
        self.settings = load_settings(_stack_config(plan.stack))
        self.bucket = _bucket(plan)
        self.node_cache = root / "node" / "cache"
        self.node_cache.mkdir(parents=True)
        # what the GPU node's boot script leaves (cluster.gpu_node_user_data): the cache, its marker
        (self.node_cache / layout.NODE_CACHE_READY).touch()
        self.env = {**s3, "HOME": str(root / "home")}
        (root / "home").mkdir()
        _aws(self.env, "s3", "mb", f"s3://{self.bucket}")

    def deployment(self, version: str) -> dict:
        return _k8s(self.plan, "Deployment", f"triton-{version}")

    def pod(self, version: str) -> Pod:
        spec = self.deployment(version)["spec"]["template"]["spec"]
        return Pod.of(spec, self.root / f"pod-{version}", {layout.NODE_CACHE: self.node_cache})

    def upload(self, profile_name: str, version: str) -> None:
        from infra.catalog import model_profiles

        profile = model_profiles()[profile_name]
        stage = self.root / "upload" / version
        tritonserver = self.pod(version).container("tritonserver")
        cache_mount = next(m for m in tritonserver["volumeMounts"] if m["name"] == "model-cache")
        # the pod sees the version at the mount path; the upload renders for that same path, mapped
        assert cache_mount["mountPath"] == layout.POD_ROOT
        runtime = self.node_cache / cache_mount["subPath"]
        _upload(stage, profile_name, version, profile.model_id, profile.path, runtime)
        _aws(
            self.env,
            "s3",
            "sync",
            "--only-show-errors",
            str(stage),
            f"s3://{self.bucket}/{profile_name}/{version}/",
        )
        if profile.path == "engine":
            checkpoint = self.root / "upload" / "hf-checkpoint"
            checkpoint.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(offline_tokenizer_dir()) / "config.json", checkpoint / "config.json")
            _aws(
                self.env, "s3", "sync", "--only-show-errors", str(checkpoint),
                f"s3://{self.bucket}/{layout.build_checkpoint_prefix(profile.model_id)}",
            )  # fmt: skip
            self.build_engines(profile_name, version)

    def build_engines(self, profile_name: str, version: str) -> None:
        """The engine-build Job as rendered; only ``trtllm-build`` (the GPU step) is stood in for."""
        job = _k8s(self.plan, "Job", f"engine-build-{profile_name}-{version}".replace(".", "-")[:63])
        pod = Pod.of(job["spec"]["template"]["spec"], self.root / f"build-{version}", {})
        pod.run("fetch-checkpoint", self.env)
        work = pod.volumes["work"]
        assert (work / "checkpoint" / "config.json").is_file()
        script = _k8s(self.plan, "ConfigMap", f"engine-build-{version}")["data"]["build.sh"]
        build = pod.container("build")
        assert build["command"] == ["bash", "/scripts/build.sh"]
        output = script.split("--output_dir ")[-1].split()[0]  # trtllm-build's, the last step
        engines = Path(pod.map_text(output, pod.mounts(build)))
        engines.mkdir(parents=True)
        (engines / "config.json").write_text(json.dumps({"stand_in": "trtllm-build", "version": version}))
        (engines / "rank0.engine").write_bytes(b"\0" * 1024)
        pod.run("upload-engine", self.env)

    def sync(self, version: str) -> str:
        return self.pod(version).run("model-sync", self.env).stdout

    def serve(self, version: str, *, llmapi: bool, record: Path) -> TritonServer:
        """tritonserver with the Deployment's own command line (ports and addresses made local)."""
        pod = self.pod(version)
        container = pod.container("tritonserver")
        argv = pod.argv(container, skip=("/dev/shm",))
        assert argv[0] == "tritonserver"
        flags = dict(a.removeprefix("--").split("=", 1) for a in argv[1:])
        assert set(flags) == {
            "model-repository", "http-port", "grpc-port", "metrics-port", "allow-gpu-metrics",
            "exit-timeout-secs", "log-verbose",
        }  # fmt: skip
        server = TritonServer(
            Path(flags.pop("model-repository")),
            free_port(),
            free_port(),
            free_port(),
            workdir=self.root / f"triton-{version}",
            extra_backends={} if llmapi else {"tensorrtllm": CPU_TRTLLM_BACKEND},
            flags={k: v for k, v in flags.items() if not k.endswith("-port")},
        )
        env = pod.env(container, {"DUALTRACK_TEST_RECORD": str(record)}, skip=("/dev/shm",))
        server.env = {e["name"]: env[e["name"]] for e in container.get("env", [])}
        server.env["DUALTRACK_TEST_RECORD"] = str(record)
        if llmapi:  # the image's TensorRT-LLM is the LLM API test double here
            image = image_python(self.root / "image-python", LLMAPI_DOUBLE)
            server.env["PATH"] = f"{image}:{server.environment()['PATH']}"
        server.start(timeout_s=300)
        assert f"--allow-gpu-metrics={flags['allow-gpu-metrics']}" in server.command(Path("-"))
        return server


def _stack_config(stack: str) -> dict:
    from dualtrack.plan import load_stack_config

    return load_stack_config(stack)


def _series(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> (name, labels, value) for every sample."""
    import re

    samples = []
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def _assert_scaling_input(metrics: str) -> None:
    """The series the HPA's recording rule reads is one this served model really exports."""
    assert WAITING_SERIES in RECORDING_RULES["triton:requests_waiting"]
    name, _, matcher = WAITING_SERIES.partition("{")
    label, _, value = matcher.rstrip("}").partition("=")
    exported = {(n, s.get(label)) for n, s, _ in _series(metrics)}
    assert (name, value.strip('"')) in exported, metrics[-2000:]


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def _tail(tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer.encode(prompt)
    return tokenizer.decode(ids[-n:], skip_special_tokens=True)


def _check_sync(replay: Replay, version: str, profile: str) -> None:
    assert replay.sync(version) == ""
    cached = replay.node_cache / profile / version
    assert {p.name for p in cached.iterdir()} >= {layout.REPOSITORY, layout.TOKENIZER}
    before = _files(cached)
    assert replay.sync(version) == ""  # a restarted pod on the same node: nothing copied again
    assert _files(cached) == before
    assert not (replay.node_cache / profile / f"{version}.lock").exists()  # the lock went with the sync


def test_pods_of_a_node_share_one_sync(plans: dict[str, Plan], tmp_path: Path, s3: dict) -> None:
    """Two pods of a version starting together on one node, and one that died holding the lock."""
    import concurrent.futures
    import os

    replay = Replay(plans["dev"], tmp_path, s3)
    profile, version = replay.settings.serving.profile, replay.settings.serving.model_version
    replay.upload(profile, version)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: replay.pod(version).run("model-sync", replay.env), range(2)))
    assert all(r.returncode == 0 for r in runs)  # neither deleted the other's downloads
    cached = replay.node_cache / profile / version
    assert (cached / layout.ENGINES / "config.json").is_file()
    stale = replay.node_cache / profile / f"{version}.lock"
    stale.mkdir()
    os.utime(stale, (time.time() - 120, time.time() - 120))  # a pod killed mid-sync two minutes ago
    taken = replay.pod(version).run("model-sync", replay.env)
    assert "taking over a sync lock its pod left" in taken.stderr and not stale.exists()


@pytest.mark.parametrize("stack", ["dev", "staging"])
def test_engine_path_pod_serves_from_the_bucket(
    plans: dict[str, Plan], tmp_path: Path, s3: dict, stack: str
) -> None:
    replay = Replay(plans[stack], tmp_path, s3)
    serving = replay.settings.serving
    versions = [(serving.model_version, serving.profile)]
    if serving.canary:
        versions.append((serving.canary.version, serving.canary.profile or serving.profile))
    tokenizer = AutoTokenizer.from_pretrained(offline_tokenizer_dir())
    for version, profile in versions:
        replay.upload(profile, version)
        _check_sync(replay, version, profile)
        assert (replay.node_cache / profile / version / layout.ENGINES / "config.json").is_file()
        record = tmp_path / f"calls-{version}.jsonl"
        server = replay.serve(version, llmapi=False, record=record)
        try:
            with httpx.stream(
                "POST",
                f"{server.url}/v2/models/ensemble/generate_stream",
                json={"text_input": PROMPT, "max_tokens": 6, "stream": True},
                timeout=60,
            ) as r:
                assert r.status_code == 200, r.read()
                texts = [e["text_output"] for e in _events(r) if e["text_output"]]
            # token by token (each streamed response detokenized alone): the prompt's tail, echoed
            assert len(texts) >= 3 and "".join(texts) == _tail(tokenizer, PROMPT, 6).replace(" ", "")
            metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
            _assert_scaling_input(metrics)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def prod(plans: dict[str, Plan], tmp_path_factory: pytest.TempPathFactory, s3: dict) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("replay-prod")
    replay = Replay(plans["prod"], root, s3)
    serving = replay.settings.serving
    replay.upload(serving.profile, serving.model_version)
    _check_sync(replay, serving.model_version, serving.profile)
    record = root / "calls.jsonl"
    server = replay.serve(serving.model_version, llmapi=True, record=record)
    try:
        yield server, record, replay
    finally:
        server.stop()


def test_llmapi_pod_loads_the_checkpoint_with_the_rendered_settings(prod: tuple) -> None:
    _, record, replay = prod
    (loaded,) = [c["loaded"] for c in recorded_calls(record) if "loaded" in c]
    profile = replay.settings.serving.model
    assert loaded["model"] == str(replay.node_cache / profile.name / "v1" / layout.CHECKPOINT)
    assert loaded["tokenizer"] == str(replay.node_cache / profile.name / "v1" / layout.TOKENIZER)
    assert loaded["tensor_parallel_size"] == 8 and loaded["moe_expert_parallel_size"] == 8
    assert loaded["max_input_len"] == profile.max_input_len and loaded["enable_chunked_prefill"] is True


def test_llmapi_pod_streams_an_answer(prod: tuple) -> None:
    server, _, _ = prod
    tokenizer = AutoTokenizer.from_pretrained(offline_tokenizer_dir())
    body = {"text_input": [PROMPT], "streaming": [True], "sampling_param_max_tokens": [6]}
    with httpx.stream(
        "POST", f"{server.url}/v2/models/tensorrt_llm/generate_stream", json=body, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        events = _events(r)
    texts = [e["text_output"] for e in events]
    assert len(texts) == 6 and texts[-1] == _tail(tokenizer, PROMPT, 6)
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative: the contract
    assert events[-1]["finish_reason"] == "length"


def test_llmapi_pod_accepts_long_prompts_and_refuses_too_long_ones(prod: tuple) -> None:
    server, _, replay = prod
    limit = replay.settings.serving.model.max_input_len
    long_prompt = "word " * 20_000  # > max_num_tokens: needs chunked prefill
    r = httpx.post(
        f"{server.url}/v2/models/tensorrt_llm/generate",
        json={"text_input": [long_prompt], "sampling_param_max_tokens": [2]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{server.url}/v2/models/tensorrt_llm/generate",
        json={"text_input": ["word " * (limit + 10)], "sampling_param_max_tokens": [2]},
        timeout=120,
    )
    assert r.status_code == 400 and f"this model accepts at most {limit}" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/tensorrt_llm/generate", json={"text_input": ["  "]}, timeout=30)
    assert r.status_code == 400 and "the prompt is empty" in r.json()["error"]


def test_llmapi_pod_honours_stop_strings_and_cancellation(prod: tuple) -> None:
    server, record, _ = prod
    body = {"text_input": [PROMPT], "sampling_param_max_tokens": [8], "sampling_param_stop": ["briefly"]}
    r = httpx.post(f"{server.url}/v2/models/tensorrt_llm/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert "briefly" not in r.json()["text_output"] and r.json()["finish_reason"] == "stop"
    body = {"text_input": ["one two three " * 20], "streaming": [True], "sampling_param_max_tokens": [24]}
    call = close_stream_early(f"{server.url}/v2/models/tensorrt_llm/generate_stream", body, record)
    assert call["cancelled"] is True and call["tokens_sent"] < 24


def test_llmapi_pod_exports_the_scaling_signal(prod: tuple) -> None:
    server, _, _ = prod
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    _assert_scaling_input(text)
    series = _series(text)
    gauges = {s["request_type"]: value for name, s, value in series if name == "nv_trt_llm_request_metrics"}
    assert set(gauges) == {"waiting", "active", "max"} and gauges["max"] == 64  # the executor's batch
    assert gauges["waiting"] == 0 and gauges["active"] == 0  # nothing in flight between tests


def test_llmapi_pod_counts_requests_in_flight(prod: tuple) -> None:
    import threading

    server, record, _ = prod
    body = {"text_input": ["one two three " * 10], "streaming": [True], "sampling_param_max_tokens": [12]}

    def stream() -> None:
        with httpx.stream(
            "POST", f"{server.url}/v2/models/tensorrt_llm/generate_stream", json=body, timeout=60
        ) as r:
            r.read()

    def gauges() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        return {s["request_type"]: v for n, s, v in _series(text) if n == "nv_trt_llm_request_metrics"}

    delay = record.parent / "delay"
    delay.write_text("0.2")  # 12 tokens: about 2.4 s a request
    try:
        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        deadline, seen = time.monotonic() + 10, {}
        while time.monotonic() < deadline and seen.get("active") != 3:
            seen = gauges()
            time.sleep(0.1)
        assert seen["active"] == 3 and seen["waiting"] == 0  # 3 of 64 slots: nothing waits
        for t in threads:
            t.join()
    finally:
        delay.unlink()
    assert gauges()["active"] == 0
