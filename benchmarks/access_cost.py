"""What sign-in, document permissions, the audit trail and DLP cost per request.

Two gateways serve one knowledge base (Milvus Lite, the sample corpus copied ``--copies``
times) in one process, over real HTTP:

* **baseline**: sign-in off (loopback), audit off: every request reads everything;
* **secured**: a service API key looked up in a key file, the reader's access list and
  clearance applied in Milvus, one hash-chained audit record per request.

``POST /v1/search`` is timed on both, interleaved, and each part is timed on its own: the key
lookup, the Milvus search with and without the access filter, one audit write, the DLP scan
of a question and of a prompt-sized text.

    .venv/bin/python benchmarks/access_cost.py --requests 300 --out bench-results/access.json
    benchmarks/with-standalone.sh .venv/bin/python benchmarks/access_cost.py \
        --milvus-uri http://127.0.0.1:19530 --out bench-results/access-standalone.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' helpers (sample corpus, in-process server)

from services.audit.log import AuditLog  # noqa: E402
from services.auth.authenticator import Authenticator  # noqa: E402
from services.auth.keys import KeyStore  # noqa: E402
from services.auth.principal import Role  # noqa: E402
from services.config import load_settings  # noqa: E402
from services.gateway.app import create_app  # noqa: E402
from services.kb import schema  # noqa: E402
from services.kb.access import EVERYTHING, Reader, tokens_of  # noqa: E402
from services.kb.classification import Classification  # noqa: E402
from services.kb.filters import in_list, literal  # noqa: E402
from services.kb.service import KnowledgeBase  # noqa: E402
from services.llm.dlp import Scanner  # noqa: E402
from tests.support import SAMPLES, serve, wait_ready  # noqa: E402

QUERIES = [
    "How many vacation days do full-time employees get?",
    "What is the per diem for a full day abroad?",
    "How do I promote the database replica?",
    "Who approves trips longer than ten days?",
    "What does the robot fleet firmware update change?",
]


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] * 1000


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--milvus-uri", help="a Milvus server (default: Milvus Lite embedded)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dualtrack-access-bench-"))
    keys = KeyStore(work / "keys.db")
    key, _ = keys.create("bench", [Role.READER], ["staff", "ops"], Classification.INTERNAL, timedelta(days=1))
    milvus = (
        {"uri": args.milvus_uri, "collection": f"access_bench_{work.name[-8:]}"} if args.milvus_uri else {}
    )
    base = {"milvus": milvus or {"uri": str(work / "kb.db")}, "access": {"default_groups": ["staff"]}}
    open_settings = load_settings(**base, gateway={"auth_enabled": False}, audit={"enabled": False})
    secured_settings = load_settings(
        **base, gateway={"keys_file": str(keys.path)}, audit={"dir": str(work / "audit")}
    )
    kb = KnowledgeBase(open_settings)
    kb.start()
    docs = [p for p in sorted(SAMPLES.rglob("*")) if p.suffix in (".md", ".txt", ".html", ".pdf", ".docx")]
    docs = [p for p in docs if p.name != "README.md"]
    for copy in range(args.copies):
        for path in docs:
            kb.ingestor.ingest_bytes(path.read_bytes(), f"copy{copy}/{path.relative_to(SAMPLES)}")
    kb.store.flush()
    chunks = kb.store.count_chunks()
    results: dict[str, dict[str, float]] = {}

    with serve(create_app(open_settings, kb)) as open_url, serve(create_app(secured_settings, kb)) as sec_url:
        wait_ready(open_url)
        wait_ready(sec_url)
        lat = {"baseline": [], "secured": []}
        with httpx.Client(timeout=60) as client:
            for i in range(args.requests + 20):
                q = {"query": QUERIES[i % len(QUERIES)], "top_k": 5}
                for name, url, headers in (
                    ("baseline", open_url, {}),
                    ("secured", sec_url, {"Authorization": f"Bearer {key}"}),
                ):
                    t = time.perf_counter()
                    r = client.post(f"{url}/v1/search", json=q, headers=headers)
                    took = time.perf_counter() - t
                    assert r.status_code == 200 and r.json()["hits"], r.text
                    if i >= 20:  # warm-up
                        lat[name].append(took)
        for name, values in lat.items():
            results[f"search over HTTP: {name}"] = {"p50_ms": p50(values), "p95_ms": p95(values)}

    authenticator = Authenticator(secured_settings.gateway)
    loop = asyncio.new_event_loop()
    results["key lookup (Authenticator)"] = _stats(
        timed(lambda _: loop.run_until_complete(authenticator.principal(f"Bearer {key}")), args.requests)
    )
    vectors = [kb.embedder.embed_query(q) for q in QUERIES]
    reader = Reader(
        (Classification.PUBLIC, Classification.INTERNAL), tuple(tokens_of("bench", ["staff", "ops"]))
    )
    store_lat: dict[str, list[float]] = {"everything (baseline)": [], "access filter": []}
    for i in range(args.requests):  # interleaved, as over HTTP: drift hits both alike
        for name, r in (("everything (baseline)", EVERYTHING), ("access filter", reader)):
            t = time.perf_counter()
            kb.store.search(vectors[i % 5], 5, reader=r)
            store_lat[name].append(time.perf_counter() - t)
    for name, values in store_lat.items():
        results[f"store search: {name}"] = _stats(values)
    # the same reader's rows selected by the array field or by the ACL key, raw Milvus searches
    labels = in_list(schema.CLASSIFICATION, [c.value for c in reader.labels])
    tokens = ", ".join(literal(t) for t in reader.tokens or ())
    filters = {
        "labels only": labels,
        "labels and acl_key in": reader.expression(kb.store.acl_keys()),
        "labels and array_contains_any": f"{labels} and array_contains_any({schema.ACL}, [{tokens}])",
    }
    raw: dict[str, list[float]] = {name: [] for name in filters}
    for i in range(args.requests):
        for name, expr in filters.items():
            t = time.perf_counter()
            kb.store.client.search(
                kb.store.collection,
                data=[vectors[i % 5].tolist()],
                limit=14,
                filter=expr,
                output_fields=list(schema.CHUNK_OUTPUT_FIELDS),
            )
            raw[name].append(time.perf_counter() - t)
    for name, values in raw.items():
        results[f"raw Milvus search: {name}"] = _stats(values)
    audit = AuditLog(load_settings(audit={"dir": str(work / "audit-alone")}).audit)
    record = {
        "ts": "2026-12-02T00:00:00.000000Z",
        "request_id": "0" * 32,
        "principal": {"subject": "bench", "kind": "service", "issuer": None},
        "action": "search",
        "status": 200,
        "question": {"sha256": "0" * 64},
        "results": [
            {
                "chunk_id": "0" * 32,
                "doc_id": "copy0--handbook--employee-handbook.md",
                "classification": "internal",
            }
        ]
        * 5,
    }
    results["audit record write"] = _stats(timed(lambda _: audit.write(record), args.requests))
    scanner = Scanner()
    prompt = "\n\n".join(c.text for c in kb.store.chunks_of(*_first_doc(kb))[:5])
    results["DLP scan: question"] = _stats(timed(lambda i: scanner.scan(QUERIES[i % 5]), args.requests))
    results["DLP scan: prompt"] = _stats(timed(lambda _: scanner.scan(prompt), max(20, args.requests // 5)))
    results["DLP scan: prompt"]["chars"] = len(prompt)
    if args.milvus_uri:  # a server outlives the run: leave nothing behind
        kb.store.client.drop_collection(kb.store.collection)
        kb.store.client.drop_collection(kb.store.registry)
    kb.close()

    secured, baseline = results["search over HTTP: secured"], results["search over HTTP: baseline"]
    summary = {
        "chunks": chunks,
        "requests": args.requests,
        "overhead_p50_ms": secured["p50_ms"] - baseline["p50_ms"],
        "ratio_p50": secured["p50_ms"] / baseline["p50_ms"],
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50_ms": p50(values), "p95_ms": p95(values)}


def _first_doc(kb: KnowledgeBase) -> tuple[str, str]:
    doc = kb.store.get_document("copy0--handbook--employee-handbook.md")
    assert doc is not None
    return doc.doc_id, doc.version


if __name__ == "__main__":
    main()
