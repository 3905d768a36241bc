"""`dualtrack local up` / `kb ingest` / `ask` / `status` / `down` as a user runs
them: real processes, real ports, the shipped samples."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, free_port

CLI = str(Path(sys.executable).with_name("dualtrack"))


def run(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [CLI, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("stack")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")},
        "DUALTRACK_HOME": str(home),
        "DUALTRACK_GATEWAY__PORT": str(free_port()),
        "DUALTRACK_MILVUS__URI": f"http://127.0.0.1:{free_port()}",
        "COLUMNS": "200",
    }
    up = run(env, "local", "up")
    env["_UP_OUTPUT"] = up.stdout
    yield env
    run(env, "local", "down", ok=False)


def test_up_prints_status_and_a_0600_key(stack: dict[str, str]) -> None:
    home = Path(stack["DUALTRACK_HOME"])
    key_file = home / "api-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key in stack["_UP_OUTPUT"] and "ready" in stack["_UP_OUTPUT"]


def test_ingest_ask_search_and_skip(stack: dict[str, str]) -> None:
    first = run(stack, "kb", "ingest", "docs/samples", "--exclude", "README.md")
    assert "7 ingested, 0 skipped, 0 rejected" in first.stdout
    assert "confidential" in first.stdout
    again = run(stack, "kb", "ingest", "docs/samples", "--exclude", "README.md")
    assert "0 ingested, 7 skipped, 0 rejected" in again.stdout
    singly = run(stack, "kb", "ingest", "docs/samples", "--exclude", "README.md", "--batch", "1")
    assert "0 ingested, 7 skipped, 0 rejected" in singly.stdout
    gateway_log = next(
        c["log"] for c in json.loads(run(stack, "local", "status", "--json").stdout) if c["name"] == "gateway"
    )
    requests = Path(gateway_log).read_text(errors="replace")
    assert requests.count('"POST /v1/documents/batch HTTP/1.1" 200') == 2  # a batch per run
    assert requests.count('"POST /v1/documents HTTP/1.1" 200') >= 7  # one per file with --batch 1

    ans = run(stack, "ask", "How many vacation days do full-time employees get per year?")
    assert "A: " in ans.stdout and "[1]" in ans.stdout
    port = stack["DUALTRACK_GATEWAY__PORT"]
    assert f"http://127.0.0.1:{port}/v1/documents/handbook--employee-handbook.md" in ans.stdout

    found = run(stack, "kb", "search", "promote the replica after a primary failure", "-k", "2")
    assert "runbooks--database-failover.txt" in found.stdout

    listed = run(stack, "kb", "list")
    assert "7 documents" in listed.stdout


def test_rejected_file_is_reported_with_reason_and_exit_1(stack: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4 nothing else")
    proc = run(stack, "kb", "ingest", str(bad), ok=False)
    assert proc.returncode == 1
    assert "rejected" in proc.stdout and "PDF" in proc.stdout
    (tmp_path / "ok.md").write_text("# Lockers\n\nLocker keys are at the front desk.\n")
    proc = run(stack, "kb", "ingest", str(tmp_path), ok=False)  # one batch: the bad file stops nothing
    assert proc.returncode == 1 and "1 ingested, 0 skipped, 1 rejected" in proc.stdout
    found = run(stack, "kb", "search", "Where are the locker keys?", "-k", "1")
    assert "ok.md" in found.stdout
    # a sidecar the CLI refuses and one the gateway refuses: those two files only, in order
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("alpha", "bravo", "charlie", "delta"):
        (mixed / f"{name}.md").write_text(f"# {name}\n\nThe {name} desk lends umbrellas.\n")
    (mixed / "bravo.md.meta.yaml").write_text("title: " + "t" * 201 + "\n")
    (mixed / "delta.md.meta.yaml").write_text("colour: red\n")
    proc = run(stack, "kb", "ingest", str(mixed), ok=False)
    assert proc.returncode == 1 and "2 ingested, 0 skipped, 2 rejected" in proc.stdout, proc.stdout
    table = proc.stdout.split("ingest summary", 1)[1]
    rows = [table.index(f"{name}.md ") for name in ("alpha", "bravo", "charlie", "delta")]
    assert rows == sorted(rows), proc.stdout
    assert "title" in proc.stdout and "colour" in proc.stdout


def test_status_reports_processes_logs_and_health(stack: dict[str, str]) -> None:
    out = json.loads(run(stack, "local", "status", "--json").stdout)
    by_name = {c["name"]: c for c in out}
    assert by_name["gateway"]["health"] == "ready" and by_name["milvus"]["health"] == "listening"
    for c in out:
        assert c["running"] and c["pid"]
        log = Path(c["log"])
        assert log.is_file()
        assert Path(stack["DUALTRACK_HOME"]) in log.parents
    key = (Path(stack["DUALTRACK_HOME"]) / "api-key").read_text().strip()
    for c in out:
        assert key not in Path(c["log"]).read_text(errors="replace")


def test_up_is_idempotent_and_wrong_key_is_refused(stack: dict[str, str]) -> None:
    run(stack, "local", "up")
    proc = run({**stack, "DUALTRACK_API_KEY": "wrong"}, "kb", "list", ok=False)
    assert proc.returncode == 2 and "HTTP 401" in proc.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")},
            "DUALTRACK_HOME": str(tmp_path),
            "DUALTRACK_MILVUS__URI": f"http://127.0.0.1:{port}",
        }
        proc = run(env, "local", "up", ok=False)
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr and "milvus.uri" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "DUALTRACK_HOME": str(tmp_path), "DUALTRACK_MILVUS__INDEX__TYPE": "DISKANN"}
    proc = run(env, "local", "status", ok=False)
    assert proc.returncode == 2
    assert "milvus.index.type = 'DISKANN'" in proc.stderr and "Traceback" not in proc.stderr


def test_down_stops_everything(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("down")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")},
        "DUALTRACK_HOME": str(home),
        "DUALTRACK_GATEWAY__PORT": str(free_port()),
        "DUALTRACK_MILVUS__URI": f"http://127.0.0.1:{free_port()}",
    }
    run(env, "local", "up")
    pids = [c["pid"] for c in json.loads(run(env, "local", "status", "--json").stdout)]
    assert "stopped: gateway, milvus" in run(env, "local", "down").stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    after = json.loads(run(env, "local", "status", "--json").stdout)
    assert all(not c["running"] and c["health"] == "down" for c in after)


def test_reused_pid_is_not_ours(tmp_path: Path) -> None:
    from dualtrack.local import LocalStack
    from services.config import load_settings

    stack = LocalStack(load_settings(), home=tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "gateway.pid").write_text(f"{os.getpid()} 1\n")  # alive, wrong start time
    assert stack.status()[1].pid is None
    assert stack.down() == []  # and nothing was signalled


def test_up_with_a_model_answers_with_it(tmp_path: Path) -> None:
    """`dualtrack local up --model M.gguf`: a laptop answers with a real local model."""
    from tests.support import gemma_gguf

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")},
        "DUALTRACK_HOME": str(tmp_path / "home"),
        "DUALTRACK_GATEWAY__PORT": str(free_port()),
        "DUALTRACK_MILVUS__URI": f"http://127.0.0.1:{free_port()}",
        "COLUMNS": "200",
    }
    model_port = str(free_port())
    try:
        up = run(
            env, "local", "up", "--model", str(gemma_gguf()), "--threads", "2", "--model-port", model_port
        )
        assert "model" in up.stdout and "ready" in up.stdout
        status = json.loads(run(env, "local", "status", "--json").stdout)
        assert {c["name"]: c["health"] for c in status}["model"] == "ready"
        run(env, "kb", "ingest", "docs/samples/handbook")
        ans = run(env, "ask", "How many vacation days do full-time employees get per year?")
        assert "route: local" in ans.stdout and "no generative model" not in ans.stdout
    finally:
        down = run(env, "local", "down", ok=False)
    assert "model" in down.stdout
    with socket.socket() as s:  # nothing listens on the model's port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
        s.bind(("127.0.0.1", int(model_port)))


def test_up_with_a_model_that_is_not_a_gguf_is_refused(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")},
        "DUALTRACK_HOME": str(tmp_path / "home"),
        "DUALTRACK_GATEWAY__PORT": str(free_port()),
        "DUALTRACK_MILVUS__URI": f"http://127.0.0.1:{free_port()}",
    }
    missing = run(env, "local", "up", "--model", str(tmp_path / "nope.gguf"), ok=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    wrong = run(env, "local", "up", "--model", str(fake), ok=False)
    assert wrong.returncode == 2 and "not a GGUF file" in wrong.stderr
    assert not (tmp_path / "home" / "run" / "milvus.pid").exists()  # nothing was started
