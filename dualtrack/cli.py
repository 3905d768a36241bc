"""``dualtrack``: the operator CLI.

Sub-commands are grouped by what they act on: ``local`` (the local stack),
``kb`` (the knowledge base, through the gateway), ``ask``, ``plan`` (the cloud
stack's offline plan), ``bench``. User
mistakes end with a one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dualtrack.client import GatewayClient, GatewayError
from dualtrack.local import LocalStack, LocalStackError, describe, state_dir
from infra.model_layout import POD_ROOT
from services.config import ConfigError, Settings, load_settings
from services.kb.classification import Classification, labels_from_rules, most_restrictive
from services.kb.loaders import CONTENT_TYPES, suffix_of
from services.kb.sidecar import SidecarError, is_sidecar, read_sidecar
from services.llamacpp import LlamaServerError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])
local_app = typer.Typer(no_args_is_help=True, help="Run the local stack (Milvus Lite + gateway).")
kb_app = typer.Typer(no_args_is_help=True, help="Ingest, search and delete knowledge-base documents.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures go to docs/benchmarks.md).")
model_repo_app = typer.Typer(no_args_is_help=True, help="Render and check Triton model repositories.")
onprem_app = typer.Typer(
    no_args_is_help=True, help="Configure on-prem hosts with Ansible (cloud outputs in)."
)
app.add_typer(local_app, name="local")
app.add_typer(kb_app, name="kb")
app.add_typer(bench_app, name="bench")
app.add_typer(model_repo_app, name="model-repo")
app.add_typer(onprem_app, name="onprem")
sync_app = typer.Typer(
    no_args_is_help=True, help="Knowledge sync over Kafka: the consumer and the event schema."
)
app.add_typer(sync_app, name="sync")

console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str | None, typer.Option("--url", help="Gateway URL (default: local stack)")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="DUALTRACK_API_KEY", help="API key (default: local stack's)", show_envvar=True
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _client(url: str | None, api_key: str | None) -> GatewayClient:
    settings = _settings()
    base = url or settings.gateway.base_url()
    key = api_key
    if key is None and settings.gateway.api_key is not None:
        key = settings.gateway.api_key.get_secret_value()
    for path in (settings.gateway.api_key_file, state_dir() / "api-key"):
        if key is None and path is not None and Path(path).is_file():
            try:
                key = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise _fail(f"cannot read the API key from {path}: {exc.strerror}") from None
    return GatewayClient(base, key)


# -- local stack --------------------------------------------------------------------------------


def _stack() -> LocalStack:
    try:
        return LocalStack(_settings())
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@local_app.command("up")
def local_up(
    show_key: Annotated[bool, typer.Option(help="Print the generated API key")] = True,
    model: Annotated[
        Path | None,
        typer.Option(
            help="A GGUF model to answer with (llama.cpp on this machine's cores); "
            "without one, answers are extractive"
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for the model")] = None,
) -> None:
    """Start Milvus Lite (server mode), the gateway and, with --model, a local llama.cpp model."""
    stack = _stack()
    with console.status("starting the local stack (models load in a few seconds)..."):
        try:
            stack.up(model=model, threads=threads)
        except (LocalStackError, LlamaServerError) as exc:
            raise _fail(str(exc)) from None
    _print_status(stack)
    if show_key:
        console.print(f"API key ({stack.key_file}, mode 0600): [bold]{stack.api_key()}[/]")
        console.print(f"OpenAPI docs: {stack.gateway_url}/docs")


@local_app.command("down")
def local_down() -> None:
    """Stop the gateway and Milvus Lite."""
    stopped = _stack().down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@local_app.command("status")
def local_status(json_out: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False) -> None:
    """What runs, where its logs are, and its health."""
    stack = _stack()
    if json_out:
        console.print_json(describe(stack.status()))
        return
    _print_status(stack)


def _print_status(stack: LocalStack) -> None:
    table = Table(title=f"local stack ({stack.home})")
    for col in ("component", "pid", "address", "health", "log"):
        table.add_column(col)
    for c in stack.status():
        style = "green" if c.health in ("ready", "listening") else "red"
        table.add_row(c.name, str(c.pid or "-"), c.address, Text(c.health, style=style), Text(str(c.log)))
    console.print(table)


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
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Upload documents to the knowledge base; unchanged ones are skipped.

    Exit code 1 when any file was rejected (the summary says why)."""
    files = list(_walk(paths, exclude or []))
    if not files:
        raise _fail("no supported files found (" + ", ".join(sorted(CONTENT_TYPES)) + ")")
    rules = _settings().classification.rules()
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    chunks = 0
    with (
        _client(url, api_key) as client,
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
        for path, source in files:
            progress.update(task, description=f"ingesting {source}")
            try:
                side = read_sidecar(path)
                # rules also see the absolute path, so the folder passed on the command line
                # never hides a rule such as confidential/* (labels only ever go up)
                ruled = labels_from_rules(str(path.resolve()), rules)
                given = [c for c in (classification, side.classification, *ruled) if c is not None]
                label = most_restrictive(given, default=given[0]) if given else None
                result = client.upload(
                    path,
                    source,
                    classification=label.value if label else None,
                    doc_id=side.doc_id,
                    metadata=side.metadata or None,
                    title=side.title,
                )
            except SidecarError as exc:
                result = {"name": source, "status": "rejected", "reason": str(exc), "chunks": 0}
            except GatewayError as exc:
                raise _fail(str(exc)) from None
            results.append(result)
            if result["status"] == "ingested":
                chunks += result.get("chunks", 0)
            elapsed = time.perf_counter() - started
            progress.update(task, advance=1, rate=f"{chunks / elapsed:.1f} chunks/s")
    _ingest_summary(results, time.perf_counter() - started)
    if any(r["status"] == "rejected" for r in results):
        raise typer.Exit(1)


def _ingest_summary(results: list[dict[str, Any]], elapsed: float) -> None:
    table = Table(title="ingest summary")
    for col in ("file", "status", "doc_id", "chunks", "classification", "reason"):
        table.add_column(col)
    colours = {"ingested": "green", "skipped": "cyan", "rejected": "red"}
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
        f"{counts['ingested']} ingested, {counts['skipped']} skipped, {counts['rejected']} rejected "
        f"in {elapsed:.1f}s"
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
        with _client(url, api_key) as client:
            hits = client.search(query, top_k=top_k, filter=flt)["hits"]
    except GatewayError as exc:
        raise _fail(str(exc)) from None
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
        with _client(url, api_key) as client:
            client.delete(doc_id)
    except GatewayError as exc:
        raise _fail(str(exc)) from None
    console.print(f"deleted {doc_id}")


@kb_app.command("list")
def kb_list(url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """List stored documents."""
    try:
        with _client(url, api_key) as client:
            docs = client.documents()
    except GatewayError as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"{len(docs)} documents")
    for col in ("doc_id", "title", "classification", "chunks", "source"):
        table.add_column(col)
    for d in docs:
        table.add_row(
            Text(d["doc_id"]), Text(d["title"]), d["classification"], str(d["chunks"]), Text(d["source"])
        )
    console.print(table)


@app.command("ask")
def ask(
    question: str,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", min=1, max=100)] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Ask a question; prints the answer, its citations and their URLs."""
    try:
        with _client(url, api_key) as client:
            body = client.ask(question, top_k=top_k)
    except GatewayError as exc:
        raise _fail(str(exc)) from None
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


# -- bench ---------------------------------------------------------------------------------------


@bench_app.command("kb")
def bench_kb(
    sizes: Annotated[
        str, typer.Option(help="Comma-separated vector counts for search latency")
    ] = "100000,1000000",
    ef: Annotated[str, typer.Option(help="Comma-separated HNSW ef values")] = "32,64,128",
    queries: Annotated[int, typer.Option(min=10)] = 200,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Scratch directory (default: a temp dir)")] = None,
    milvus_uri: Annotated[
        str | None, typer.Option(help="Benchmark this Milvus (default: start a Milvus Lite server)")
    ] = None,
    copies: Annotated[int, typer.Option(min=1, help="Copies of the sample corpus to ingest")] = 5,
) -> None:
    """Ingest throughput, search latency/recall vs exact FLAT, and gateway overhead."""
    from dualtrack.bench import run_kb_bench

    try:
        run_kb_bench(
            console,
            sizes=[int(s) for s in sizes.split(",") if s.strip()],
            efs=[int(e) for e in ef.split(",") if e.strip()],
            n_queries=queries,
            out=out,
            workdir=workdir,
            milvus_uri=milvus_uri,
            copies=copies,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None


@bench_app.command("plan")
def bench_plan(
    repeat: Annotated[int, typer.Option(min=1, help="Runs per stack (median reported)")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write results as JSON here")] = None,
) -> None:
    """Mocked Pulumi run of each stack, cold (fresh process) and warm, vs an empty program."""
    from dualtrack.bench_plan import run_plan_bench

    run_plan_bench(console, repeat=repeat, out=out)


# -- offline plan --------------------------------------------------------------------------------


@app.command("plan")
def plan(
    stack: Annotated[
        list[str] | None, typer.Option("--stack", "-s", help="Stack(s) to plan (default: every stack file)")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Only report whether plans/ is up to date")] = False,
    diff: Annotated[
        str | None,
        typer.Option("--diff", metavar="REV", help="Print the change against plans/ at a git revision"),
    ] = None,
) -> None:
    """Run the Pulumi program under mocks and write plans/<stack>/ (no CLI, no credentials)."""
    from dualtrack.plan import PlanError, diff_against, run_program, stack_names, stale_files, write_plan
    from infra.config import ConfigError as StackConfigError

    stacks = stack or list(stack_names())
    try:
        if diff is not None:
            text = diff_against(stacks, diff)
            console.print(
                escape(text) if text else f"no change against {diff}", highlight=False, soft_wrap=True
            )
            return
        stale: list[str] = []
        for name in stacks:
            result = run_program(name)
            if check:
                stale += [f"plans/{name}/{path}" for path in stale_files(result)]
                continue
            target = write_plan(result)
            console.print(
                f"{name}: {len(result.resources)} resources -> {_relative(target)} ({result.seconds:.2f} s)"
            )
    except (PlanError, StackConfigError) as exc:
        raise _fail(str(exc)) from None
    if check and stale:
        raise _fail("plans are stale (run `dualtrack plan` and commit):\n  " + "\n  ".join(stale), code=1)
    if check:
        console.print(f"plans up to date: {', '.join(stacks)}")


def _relative(path: Path) -> Path:
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


# -- Triton model repository -------------------------------------------------------------------


@model_repo_app.command("render")
def model_repo_render(
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory to write")],
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", help="A profile of model_repo/profiles.yaml (onprem: omit for embedding only)"
        ),
    ] = None,
    role: Annotated[
        str, typer.Option(help="cloud (ensemble) or onprem (local_fallback + embedding)")
    ] = "cloud",
    runtime_root: Annotated[
        str,
        typer.Option(
            help="Where the version's layout is when Triton runs (<root>/repository, <root>/tokenizer)"
        ),
    ] = POD_ROOT,
    tokenizer_dir: Annotated[str | None, typer.Option(help="Override the profile's tokenizer dir")] = None,
    engine_dir: Annotated[str | None, typer.Option(help="Override <root>/engines")] = None,
) -> None:
    """Fill the templates for a profile; then `model-repo check` runs on the result."""
    from dualtrack.model_repo import ModelRepoError, RenderOptions, check, render

    if role not in ("cloud", "onprem"):
        raise _fail(f"--role {role!r}: allowed: cloud, onprem")
    try:
        target = render(
            profile,
            out,
            RenderOptions(
                role=role,
                runtime_root=runtime_root,  # type: ignore[arg-type]
                tokenizer_dir=tokenizer_dir,
                engine_dir=engine_dir,
            ),
        )
        problems = check(target)
    except ModelRepoError as exc:
        raise _fail(str(exc)) from None
    if problems:
        raise _fail("rendered repository does not check:\n  " + "\n  ".join(problems), code=1)
    models = sorted(p.name for p in target.iterdir() if p.is_dir())
    console.print(f"{profile or 'embedding only'} ({role}) -> {target}: {', '.join(models)}")


@model_repo_app.command("entry")
def model_repo_entry(
    profile: Annotated[str, typer.Option("--profile", "-p", help="A profile of model_repo/profiles.yaml")],
    role: Annotated[str, typer.Option(help="cloud or onprem")] = "cloud",
) -> None:
    """Print the model a client calls, its input style and whether it reasons (the gateway's
    model / triton_inputs / reasoning)."""
    from dualtrack.model_repo import ModelRepoError, client_call

    if role not in ("cloud", "onprem"):
        raise _fail(f"--role {role!r}: allowed: cloud, onprem")
    try:
        call = client_call(profile, role)  # type: ignore[arg-type]
    except ModelRepoError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{call.model} {call.inputs} {str(call.reasoning).lower()}")


@model_repo_app.command("check")
def model_repo_check(repo: Annotated[Path, typer.Argument(help="A Triton model repository")]) -> None:
    """Parse every config.pbtxt with Triton's ModelConfig, check ensemble wiring and profile coherence."""
    from dualtrack.model_repo import ModelRepoError, check

    try:
        problems = check(repo)
    except ModelRepoError as exc:
        raise _fail(str(exc)) from None
    if problems:
        raise _fail(f"{len(problems)} problem(s) in {repo}:\n  " + "\n  ".join(problems), code=1)
    console.print(f"{repo}: ok")


# -- on-prem track ---------------------------------------------------------------------------


@onprem_app.command("apply")
def onprem_apply(
    inventory: Annotated[
        Path | None, typer.Option("-i", "--inventory", help="Ansible inventory of the site")
    ] = None,
    stack: Annotated[
        str | None, typer.Option(help="Read outputs with `pulumi stack output -s STACK`")
    ] = None,
    outputs: Annotated[Path | None, typer.Option(help="Stack outputs exported by CI (JSON or YAML)")] = None,
    standalone: Annotated[
        bool, typer.Option("--standalone", help="No cloud stack: answers stay on-prem")
    ] = False,
    playbook: Annotated[str, typer.Option(help="Playbook under ansible/playbooks")] = "site.yml",
    check: Annotated[bool, typer.Option("--check", help="Dry run: report what would change")] = False,
    diff: Annotated[bool, typer.Option("--diff", help="Show file changes (never of secrets)")] = False,
    limit: Annotated[str | None, typer.Option(help="Only these hosts (Ansible pattern)")] = None,
    tags: Annotated[str | None, typer.Option(help="Only tasks with these tags")] = None,
    extra_vars: Annotated[
        list[str] | None, typer.Option("-e", "--extra-vars", help="KEY=VALUE or @FILE (repeatable)")
    ] = None,
    vault_password_file: Annotated[
        Path | None, typer.Option(help="Decrypts the site's ansible-vault files")
    ] = None,
    wheelhouse: Annotated[
        Path | None,
        typer.Option(help="Use this wheelhouse as is (default: build/refresh one under .dualtrack/)"),
    ] = None,
) -> None:
    """Validate the cloud outputs, run the playbook with live progress, summarise per host."""
    from dualtrack.onprem import OnPremError, apply, extravars, load_outputs
    from dualtrack.wheelhouse import WheelhouseError, build

    if inventory is None:
        raise _fail("choose an inventory with -i (start from ansible/inventories/example/hosts.yml)")
    if standalone and (stack or outputs):
        raise _fail("--standalone takes no --stack/--outputs")
    if vault_password_file is not None and not vault_password_file.is_file():
        raise _fail(f"--vault-password-file {vault_password_file}: no such file")
    try:
        if standalone:
            variables: dict[str, Any] = {"dualtrack_standalone": True, "dualtrack_stack": "standalone"}
        else:
            variables = extravars(load_outputs(stack=stack, outputs_file=outputs))
        if wheelhouse is None:
            wheelhouse = state_dir() / "wheelhouse"
            console.print(f"[dim]wheelhouse: {wheelhouse} (refreshing)[/]")
            build(wheelhouse)
        elif not (wheelhouse / "requirements.txt").is_file():
            raise OnPremError(f"--wheelhouse {wheelhouse}: not a wheelhouse (`dualtrack onprem wheelhouse`)")
        variables["dualtrack_wheelhouse"] = str(wheelhouse.resolve())
        extra_args = [arg for value in extra_vars or [] for arg in ("-e", value)]
        if vault_password_file is not None:
            extra_args += ["--vault-password-file", str(vault_password_file.resolve())]
        mode = " (check mode: nothing changes)" if check else ""
        console.print(f"applying {playbook} to {inventory} for stack {variables['dualtrack_stack']}{mode}")
        result = apply(
            inventory=inventory,
            variables=variables,
            playbook=playbook,
            check=check,
            diff=diff,
            limit=limit,
            tags=tags,
            extra_args=extra_args,
            runs_dir=state_dir() / "onprem-runs",
            on_event=_ansible_progress,
        )
    except (OnPremError, WheelhouseError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"{playbook}: {result.status}")
    for col in ("host", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(col, justify="left" if col == "host" else "right")
    for host, s in sorted(result.hosts.items()):
        table.add_row(
            escape(host), str(s.ok), str(s.changed), str(s.failed), str(s.unreachable), str(s.skipped)
        )
    console.print(table)
    for failure in result.failures:
        err.print(f"[red]failed:[/] {escape(failure)}", highlight=False)
    console.print(f"[dim]artifacts: {result.artifacts}[/]")
    if not result.succeeded:
        raise typer.Exit(1)


@onprem_app.command("wheelhouse")
def onprem_wheelhouse(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to fill (incremental)")] = Path(
        ".dualtrack/wheelhouse"
    ),
) -> None:
    """Gather every wheel an on-prem host installs (for ansible-playbook runs without the driver)."""
    from dualtrack.wheelhouse import WheelhouseError, build

    try:
        target = build(out)
    except WheelhouseError as exc:
        raise _fail(str(exc)) from None
    wheels = list((target / "wheels").glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels) / 1e6
    console.print(f"{target}: {len(wheels)} wheels ({size:.0f} MB) + the project wheel")


@onprem_app.command("verify")
def onprem_verify(
    inventory: Annotated[Path, typer.Option("-i", "--inventory", help="Ansible inventory of the site")],
    limit: Annotated[str | None, typer.Option(help="Only these hosts (group or host name)")] = None,
    junit: Annotated[Path | None, typer.Option(help="Also write a JUnit XML report")] = None,
    vault_password_file: Annotated[
        Path | None, typer.Option(help="Decrypts the site's ansible-vault files")
    ] = None,
) -> None:
    """Check the converged hosts with testinfra (units, ports, firewall, secrets, readiness)."""
    from dualtrack.onprem import OnPremError, verify

    try:
        code = verify(inventory, limit, junit, vault_password_file)
    except OnPremError as exc:
        raise _fail(str(exc)) from None
    if code != 0:
        raise typer.Exit(1)


def _ansible_progress(event: dict[str, Any]) -> None:
    """One line per task result: status, host, task."""
    kinds = {
        "runner_on_ok": "ok",
        "runner_on_failed": "failed",
        "runner_on_unreachable": "unreachable",
        "runner_on_skipped": "skipped",
    }
    kind = kinds.get(event.get("event", ""))
    if kind is None:
        return
    data = event.get("event_data", {})
    res = data.get("res") or {}
    if kind == "ok" and res.get("changed"):
        kind = "changed"
    elif kind == "ok" and "censored" in res:
        kind = "done"  # a no_log task: Ansible hides whether it changed (the summary counts it)
    colour = {
        "ok": "green",
        "changed": "yellow",
        "done": "cyan",
        "failed": "red",
        "unreachable": "red",
        "skipped": "dim",
    }[kind]
    console.print(
        f"[{colour}]{kind:>11}[/] {escape(str(data.get('host')))}  {escape(str(data.get('task')))}",
        highlight=False,
    )


@sync_app.command("run")
def sync_run() -> None:
    """Apply knowledge-update (and configured Debezium) events to this knowledge base until
    SIGTERM/Ctrl-C. Settings: the ``sync`` section (``DUALTRACK_SYNC__*``); the on-prem
    kb_sync role runs the same consumer as a systemd unit."""
    import logging

    from services.kb.errors import KBError
    from services.sync import runner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runner.run(_settings())
    except (ConfigError, KBError, ConnectionError) as exc:
        raise _fail(str(exc)) from None


@sync_app.command("publish-existing")
def sync_publish_existing(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker's acknowledgements")] = 120.0,
) -> None:
    """Publish every document already in this knowledge base (public/internal only), e.g. when
    a site starts publishing. Uses the ``sync`` settings and this site's outbox."""
    from services.kb.errors import KBError
    from services.kb.service import KnowledgeBase
    from services.sync.publisher import Publisher

    settings = _settings()
    kb = KnowledgeBase(settings)
    kb.load_model()
    publisher = Publisher(settings, lambda: kb.store, lambda: kb.embedder.model_id)
    try:
        with Progress(TextColumn("{task.description}"), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task("queueing documents", total=None)
            seen = publisher.publish_existing(lambda _record: bar.advance(task))
        withheld = sum(
            publisher.metrics.registry.get_sample_value(
                "dualtrack_sync_withheld_total", {"classification": c.value}
            )
            or 0
            for c in Classification
        )
        console.print(f"{seen} documents queued; {int(withheld)} withheld by sync.max_classification")
        if not publisher.drain(timeout):
            raise _fail(
                f"{publisher.outbox.count()} event(s) still wait for the broker (kept in the outbox)", 1
            )
        console.print("every event acknowledged by the broker")
    except KBError as exc:
        raise _fail(str(exc)) from None
    finally:
        publisher.close(timeout=5)
        kb.close()


@sync_app.command("rewind")
def sync_rewind() -> None:
    """Move the consumer group back to the start of the topic (stop the consumer first).
    After a backup restore: the restored ledger lets exactly the newer events apply."""
    from services.sync.consumer import rewind

    settings = _settings()
    try:
        pending = rewind(settings)
    except ConnectionError as exc:
        raise _fail(str(exc)) from None
    for topic, n in pending.items():
        console.print(f"{topic}: {n} events to re-read")


@sync_app.command("schema")
def sync_schema(
    check: Annotated[
        Path | None, typer.Option("--check", help="Exit 1 if this file differs from the schema (CI).")
    ] = None,
) -> None:
    """Print the JSON Schema of a knowledge-update event (docs/sync-event.schema.json)."""
    import json

    from services.sync.events import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if check is None:
        sys.stdout.write(text)
        return
    if not check.is_file() or check.read_text(encoding="utf-8") != text:
        raise _fail(f"{check} is not the current event schema: dualtrack sync schema > {check}", code=1)
    console.print(f"{check}: current")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
