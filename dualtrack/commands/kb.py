"""``dualtrack kb`` and ``dualtrack ask``: the knowledge base, through the gateway."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dualtrack.client import BatchNotTaken, GatewayError
from dualtrack.commands.common import KeyOpt, UrlOpt, console, fail, gateway_client, settings_or_fail
from services.kb.classification import Classification, labels_from_rules, most_restrictive
from services.kb.errors import KBError
from services.kb.loaders import CONTENT_TYPES, suffix_of
from services.kb.sidecar import SidecarError, is_sidecar, read_sidecar

kb_app = typer.Typer(no_args_is_help=True, help="Ingest, search and delete knowledge-base documents.")
ask_app = typer.Typer()

# -- knowledge base -----------------------------------------------------------------------------


def _walk(paths: list[Path], exclude: list[str]) -> Iterator[tuple[Path, str]]:
    """(file, source) pairs: directories recurse to supported files (sidecars,
    hidden and excluded files skipped); files named explicitly are always tried."""
    for path in paths:
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                if (
                    f.is_file()
                    and not is_sidecar(f)
                    and not any(p.startswith(".") for p in rel.parts)
                    and suffix_of(f.name) in CONTENT_TYPES
                    and not any(fnmatch(rel.as_posix(), pat) for pat in exclude)
                ):
                    yield f, rel.as_posix()
        else:
            yield path, path.name


@kb_app.command("ingest")
def kb_ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories", exists=True)],
    classification: Annotated[
        Classification | None, typer.Option(help="Label for these files (the most restrictive label wins)")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Glob of relative paths to skip (repeatable)")
    ] = None,
    batch: Annotated[
        int,
        typer.Option(
            min=1,
            max=1000,
            help="Files per request: the gateway batches their writes (1: one file per request)",
        ),
    ] = 16,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Upload documents to the knowledge base; unchanged ones are skipped.

    Files go in batches (``--batch``, within the gateway's ``ingest.max_file_bytes`` per
    request); each file is still ingested, skipped or rejected on its own. Exit code 1 when
    any file was rejected or refused (the summary says why)."""
    files = list(_walk(paths, exclude or []))
    if not files:
        raise fail("no supported files found (" + ", ".join(sorted(CONTENT_TYPES)) + ")")
    settings = settings_or_fail()
    rules = settings.classification.rules()
    room = settings.ingest.max_file_bytes
    slots: list[dict[str, Any] | None] = [None] * len(files)
    started = time.perf_counter()
    with (
        gateway_client(url, api_key) as client,
        Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("ingesting", total=len(files), rate="")
        pending: list[tuple[int, Path, dict[str, Any]]] = []
        per_request = batch

        def send() -> None:
            nonlocal per_request
            if not pending:
                return
            first = pending[0][2]["source"]
            more = f" (+{len(pending) - 1})" if len(pending) > 1 else ""
            progress.update(task, description=f"ingesting {first}{more}")
            entries = [(path, opts) for _, path, opts in pending]
            try:
                done = None
                if len(entries) > 1:
                    try:
                        done = client.upload_batch(entries)
                    except BatchNotTaken as refused:
                        # no batch endpoint: one by one from now on; over its limits: smaller batches
                        per_request = 1 if refused.status != 413 else max(per_request // 2, 1)
                if done is None:
                    done = [client.upload(path, **opts) for path, opts in entries]
            except GatewayError as exc:
                raise fail(str(exc)) from None
            for (i, _, _), result in zip(pending, done, strict=True):
                slots[i] = result
            chunks = sum(r.get("chunks", 0) for r in slots if r is not None and r["status"] == "ingested")
            elapsed = time.perf_counter() - started
            progress.update(task, advance=len(pending), rate=f"{chunks / elapsed:.1f} chunks/s")
            pending.clear()

        for i, (path, source) in enumerate(files):
            try:
                opts = _upload_options(path, source, classification, rules)
            except SidecarError as exc:
                slots[i] = {"name": source, "status": "rejected", "reason": str(exc), "chunks": 0}
                progress.update(task, advance=1)
                continue
            size = path.stat().st_size
            held = sum(p.stat().st_size for _, p, _ in pending)
            if pending and (len(pending) >= per_request or held + size > room):
                send()
            pending.append((i, path, opts))
        send()
    results = [r for r in slots if r is not None]
    _ingest_summary(results, time.perf_counter() - started)
    if any(r["status"] in ("rejected", "refused") for r in results):
        raise typer.Exit(1)


def _upload_options(
    path: Path, source: str, classification: Classification | None, rules: Any
) -> dict[str, Any]:
    """What one file is uploaded with: its sidecar's options and the most restrictive of the
    given label, the sidecar's and the local path rules' (labels only ever go up)."""
    side = read_sidecar(path)
    # rules also see the absolute path, so the folder passed on the command line
    # never hides a rule such as confidential/*
    ruled = labels_from_rules(str(path.resolve()), rules)
    given = [c for c in (classification, side.classification, *ruled) if c is not None]
    label = most_restrictive(given, default=given[0]) if given else None
    return {
        "source": source,
        "classification": label.value if label else None,
        "doc_id": side.doc_id,
        "metadata": side.metadata or None,
        "title": side.title,
        "groups": side.acl.groups if side.acl else None,
        "users": side.acl.users if side.acl else None,
    }


def _ingest_summary(results: list[dict[str, Any]], elapsed: float) -> None:
    table = Table(title="ingest summary")
    for col in ("file", "status", "doc_id", "chunks", "classification", "reason"):
        table.add_column(col)
    colours = {"ingested": "green", "skipped": "cyan", "rejected": "red", "refused": "red"}
    for r in results:
        table.add_row(  # Text(): file names and reasons are data, not rich markup
            Text(r["name"]),
            Text(r["status"], style=colours[r["status"]]),
            Text(r.get("doc_id") or "-"),
            str(r.get("chunks", 0)),
            r.get("classification") or "-",
            Text(r.get("reason") or ""),
        )
    console.print(table)
    counts = {s: sum(1 for r in results if r["status"] == s) for s in colours}
    console.print(
        f"{counts['ingested']} ingested, {counts['skipped']} skipped, {counts['rejected']} rejected"
        + (f", {counts['refused']} refused" if counts["refused"] else "")
        + f" in {elapsed:.1f}s"
    )


@kb_app.command("search")
def kb_search(
    query: str,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", min=1, max=100)] = None,
    classification: Annotated[list[Classification] | None, typer.Option(help="Only these labels")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Semantic search; prints the top chunks with scores."""
    flt = {"classifications": [c.value for c in classification]} if classification else None
    try:
        with gateway_client(url, api_key) as client:
            hits = client.search(query, top_k=top_k, filter=flt)["hits"]
    except GatewayError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"search: {query}")
    for col in ("#", "score", "document", "page", "section", "text"):
        table.add_column(col, overflow="fold")
    for i, h in enumerate(hits, start=1):
        table.add_row(
            str(i),
            f"{h['score']:.3f}",
            Text(h["doc_id"]),
            str(h["page"] or "-"),
            Text(h["section"] or "-"),
            Text(h["text"][:160] + ("..." if len(h["text"]) > 160 else "")),
        )
    console.print(table)


@kb_app.command("delete")
def kb_delete(doc_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Delete a document and all its chunks."""
    try:
        with gateway_client(url, api_key) as client:
            client.delete(doc_id)
    except GatewayError as exc:
        raise fail(str(exc)) from None
    console.print(f"deleted {doc_id}")


@kb_app.command("access")
def kb_access(
    doc_id: str,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log)")],
    classification: Annotated[Classification | None, typer.Option(help="The new label")] = None,
    group: Annotated[
        list[str] | None, typer.Option(help='Who may read it (repeatable; "*" is everyone)')
    ] = None,
    user: Annotated[list[str] | None, typer.Option(help="A user who may read it (repeatable)")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Set a document's label and access list (admin). Unlike a re-ingest, this may lower the
    label or widen the list; the gateway's audit log records who did it and why."""
    if classification is None and not group and not user:
        raise fail("nothing to change: give --classification, --group or --user")
    try:
        with gateway_client(url, api_key) as client:
            changed = client.set_access(
                doc_id,
                classification=classification.value if classification else None,
                groups=group or None,
                users=user or None,
                reason=reason,
            )
    except GatewayError as exc:
        raise fail(str(exc)) from None
    before, after = changed["before"], changed["after"]
    console.print(
        f"{escape(doc_id)}: {before['classification']} -> {after['classification']}, "
        f"[{escape(_access(before))}] -> [{escape(_access(after))}]"
    )


def _access(doc: dict[str, Any]) -> str:
    acc = doc["access"]
    return ", ".join([*acc["groups"], *(f"user:{u}" for u in acc["users"])])


@kb_app.command("migrate")
def kb_migrate() -> None:
    """Bring a knowledge base written by an earlier release to the current layout: chunks sized
    to the embedder, the BM25 index (rebuilt into a new collection and switched by alias while
    the old one serves), access lists. Resumable: rerun it after an interruption. Only a
    knowledge base from before access lists needs the gateway and sync consumer stopped."""
    from services.kb.embedder import Embedder
    from services.kb.migrate import MigrationError, migrate
    from services.kb.relayout import RelayoutError, relayout

    settings = settings_or_fail()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks: dict[str, Any] = {}

        def report(what: str) -> Callable[[str, int, int], None]:
            def update(name: str, done: int, total: int) -> None:
                key = f"{what} {name}"
                if key not in tasks:
                    tasks[key] = progress.add_task(key, total=total)
                progress.update(tasks[key], completed=done, total=total)

            return update

        try:
            results = migrate(settings, report("copying"))
            relaid = relayout(settings, Embedder(settings.embedding), report("documents:"))
        except (MigrationError, RelayoutError, KBError) as exc:
            raise fail(str(exc)) from None
    for r in results:
        if r.kept_as:
            console.print(
                f"{escape(r.collection)}: {r.rows} rows migrated; the original is {escape(r.kept_as)}"
            )
    name = escape(settings.milvus.collection)
    if relaid.built:
        console.print(
            f"{name}: rebuilt into {escape(relaid.built)} with the BM25 index and switched "
            f"(alias {name}); the previous collection is kept as {escape(relaid.kept_as or '')}"
        )
    if relaid.built or relaid.relabelled:
        console.print(
            f"{name}: {relaid.documents} documents, {relaid.chunks_before} chunks before, "
            f"{relaid.chunks_after} after (verified per document); {relaid.relabelled} relabelled, "
            f"{relaid.reembedded} re-embedded"
        )
    else:
        console.print(f"{name}: up to date ({relaid.documents} documents, {relaid.chunks_after} chunks)")


@kb_app.command("list")
def kb_list(url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """List stored documents."""
    try:
        with gateway_client(url, api_key) as client:
            docs = client.documents()
    except GatewayError as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{len(docs)} documents")
    for col in ("doc_id", "title", "classification", "access", "chunks", "source"):
        table.add_column(col)
    for d in docs:
        table.add_row(
            Text(d["doc_id"]),
            Text(d["title"]),
            d["classification"],
            Text(_access(d)),
            str(d["chunks"]),
            Text(d["source"]),
        )
    console.print(table)


@ask_app.command("ask")
def ask(
    question: str,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", min=1, max=100)] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Ask a question; prints the answer, its citations and their URLs."""
    try:
        with gateway_client(url, api_key) as client:
            body = client.ask(question, top_k=top_k)
    except GatewayError as exc:
        raise fail(str(exc)) from None
    console.print(f"[bold]Q:[/] {question}")
    console.print(f"[bold]A:[/] {escape(body['answer'])}", soft_wrap=True)
    if body["route"] == "extractive":
        console.print("[dim](no generative model configured: the answer quotes the passages)[/]")
    why = body.get("route_reason")
    failover = f"; cloud not used: {body['failover']}" if body.get("failover") else ""
    console.print(
        f"[dim]route: {body['route']}{f' ({why}{failover})' if why and why != 'no-cloud-endpoint' else ''}[/]"
    )
    for c in body["citations"]:
        where = f"p. {c['page']}" if c["page"] else (c["section"] or "")
        line = (
            f"  [{c['n']}] {c['title'] or c['doc_id']} ({c['source']}"
            + (f", {where}" if where else "")
            + f") [{c['classification']}] score {c['score']:.3f}"
        )
        console.print(escape(line) + f"\n      {c['url']}", highlight=False, soft_wrap=True)
