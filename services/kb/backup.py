"""``python -m services.kb.backup``: consistent, verifiable snapshots of the knowledge base.

A backup is an export through the Milvus API, so the same code serves Milvus Lite and
a standalone Milvus and a backup restores into either:

    <dest>/kb-<UTC timestamp>/
        manifest.json                 format, collections, row counts, dimension, sha256 per file
        <collection>.jsonl.gz         every row, vectors included (per collection: chunks,
                                      registry and, where sync runs, its ledger)

Consistency: before and after the export, both collections' row counts and the
registry's (document, version) pairs are compared -- a replaced document gets a new
version, so a delete-plus-insert of equal size is caught too; if a writer changed
anything meanwhile the export is retried (3 times, then it fails rather than keep a
torn snapshot). The snapshot is written under a ``.partial`` name and renamed
only when complete, so a crash never leaves something that looks like a backup.
Retention keeps the newest ``--keep`` snapshots.

Restore verifies every checksum and row count *before* touching Milvus (a corrupt backup
is rejected with the store untouched), snapshots the current contents next to the
backups (``pre-restore-...``), then replaces the collections and checks the counts.
Where knowledge sync runs, its ledger (``<collection>_sync``) is part of the snapshot, so
after a restore the consumer can re-read the topic and apply exactly what is newer.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pymilvus import MilvusClient, MilvusException

from services.config import AccessSettings, ConfigError, MilvusSettings, load_settings
from services.kb import schema
from services.kb.errors import KBError
from services.kb.rows import plain, rows
from services.kb.store import MILVUS_ERRORS, milvus_message

FORMAT = "dualtrack-kb-backup/1"
PREFIX = "kb-"
BATCH = 512
ATTEMPTS = 3


class BackupError(KBError):
    """A backup could not be made or restored; the message says which and why."""


def _client(settings: MilvusSettings) -> MilvusClient:
    token = settings.token.get_secret_value() if settings.token else ""
    return MilvusClient(uri=settings.uri, token=token, timeout=settings.timeout_s)


def _collections(settings: MilvusSettings, client: MilvusClient | None = None) -> list[str]:
    """Chunks and registry, plus the sync ledger where knowledge sync has created one (it must
    travel with the data it describes, or replayed events would be judged against a future)."""
    names = [settings.collection, schema.registry_name(settings.collection)]
    ledger = schema.ledger_name(settings.collection)
    if client is not None and ledger in client.list_collections():
        names.append(ledger)
    return names


def _drop(client: MilvusClient, name: str) -> None:
    """Drop collection ``name``; where it is the alias of a rebuilt collection (``dualtrack kb
    migrate``), the alias and the collection it serves. Earlier generations stay."""
    try:
        target = client.describe_alias(name)["collection_name"]
    except MilvusException:
        client.drop_collection(name)
        return
    client.drop_alias(name)
    client.drop_collection(target)


def _count(client: MilvusClient, name: str) -> int:
    rows = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(rows[0]["count(*)"])


def _state(client: MilvusClient, names: list[str], registry: str) -> tuple[dict[str, int], str]:
    """Row counts plus a digest of the registry's (doc_id, version) pairs."""
    counts = {name: _count(client, name) for name in names}
    pairs = sorted(
        (row[schema.DOC_ID], row[schema.VERSION])
        for row in client.query(
            registry, filter="", output_fields=[schema.DOC_ID, schema.VERSION], limit=16384
        )
    )
    return counts, hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _export(client: MilvusClient, names: list[str], target: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        n = 0
        with gzip.open(target / f"{name}.jsonl.gz", "wt", encoding="utf-8") as out:
            for row in rows(client, name, BATCH):
                out.write(json.dumps(plain(row), ensure_ascii=False) + "\n")
                n += 1
        counts[name] = n
    return counts


def create(settings: MilvusSettings, dest: Path, keep: int, prefix: str = PREFIX) -> Path:
    """Write one snapshot under ``dest``; returns its directory."""
    client = _client(settings)
    try:
        names = _collections(settings, client)
        for name in names:
            client.load_collection(name)
        dest.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        final = dest / f"{prefix}{stamp}"
        partial = dest / f".{prefix}{stamp}.partial"
        for _attempt in range(ATTEMPTS):
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(mode=0o700)
            before = _state(client, names, names[1])
            counts = _export(client, names, partial)
            after = _state(client, names, names[1])
            if before == after and before[0] == counts:
                break
        else:
            shutil.rmtree(partial, ignore_errors=True)
            raise BackupError(
                f"the knowledge base kept changing during {ATTEMPTS} export attempts; try later"
            )
        desc = client.describe_collection(settings.collection)
        dim = next(int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == schema.VECTOR)
    except MILVUS_ERRORS as exc:
        raise BackupError(f"backup failed: Milvus: {milvus_message(exc)}") from None
    finally:
        client.close()
    manifest = {
        "format": FORMAT,
        "created": stamp,
        "collection": settings.collection,
        "dimension": dim,
        "counts": counts,
        "sha256": {f"{name}.jsonl.gz": _sha256(partial / f"{name}.jsonl.gz") for name in names},
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    partial.rename(final)
    prune(dest, keep, prefix)
    return final


def snapshots(dest: Path, prefix: str = PREFIX) -> list[Path]:
    """Complete snapshots, oldest first."""
    if not dest.is_dir():
        return []
    return sorted(p for p in dest.iterdir() if p.is_dir() and p.name.startswith(prefix))


def prune(dest: Path, keep: int, prefix: str = PREFIX) -> list[Path]:
    removed = snapshots(dest, prefix)[:-keep] if keep > 0 else []
    for old in removed:
        shutil.rmtree(old)
    return removed


def verify(backup: Path) -> dict[str, Any]:
    """The manifest, once every file's checksum and row count match it."""
    try:
        manifest = json.loads((backup / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{backup}: no readable manifest.json ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{backup}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, count in manifest["counts"].items():
        path = backup / f"{name}.jsonl.gz"
        if not path.is_file() or _sha256(path) != manifest["sha256"].get(path.name):
            raise BackupError(f"{backup}: {path.name} is missing or does not match its checksum")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as data:
                lines = sum(1 for _ in data)
        except (OSError, EOFError) as exc:
            raise BackupError(f"{backup}: {path.name} is unreadable: {exc}") from None
        if lines != count:
            raise BackupError(f"{backup}: {path.name} holds {lines} rows, the manifest says {count}")
    return manifest


def restore(
    settings: MilvusSettings, backup: Path, dest: Path, access: AccessSettings | None = None
) -> dict[str, int]:
    """Replace the knowledge base with ``backup`` (verified first; the current one is kept).
    Rows of a snapshot taken before documents carried access lists get the ones ``access``
    gives them, as ``dualtrack kb migrate`` would."""
    from services.kb.migrate import with_access
    from services.kb.store import KnowledgeStore

    access = access or AccessSettings()
    with_acl = {settings.collection, schema.registry_name(settings.collection)}

    manifest = verify(backup)
    if manifest["collection"] != settings.collection:
        raise BackupError(
            f"{backup} holds collection {manifest['collection']!r}, this site uses {settings.collection!r}"
        )
    names = list(manifest["counts"])
    client = _client(settings)
    try:
        current = _collections(settings, client)
        if all(client.has_collection(n) for n in current[:2]):  # the chunks may be an alias
            create(settings, dest, keep=0, prefix="pre-restore-")
        for name in current:
            _drop(client, name)  # the ledger too: a backup without one means "none yet"
        store = KnowledgeStore(settings, int(manifest["dimension"]))
        # created here, under the served name, even where a rebuild's generations are kept
        store.check_engine(client)
        store.create_chunk_collection(client, settings.collection)
        store.create_registry_collection(client, schema.registry_name(settings.collection))
        store.connect()  # schema from its one definition
        if schema.ledger_name(settings.collection) in names:
            store.ensure_ledger()
        store.close()
        for name in names:
            batch: list[dict[str, Any]] = []
            with gzip.open(backup / f"{name}.jsonl.gz", "rt", encoding="utf-8") as data:
                for line in data:
                    row = json.loads(line)
                    batch.append(with_access(row, access) if name in with_acl else row)
                    if len(batch) >= BATCH:
                        client.insert(name, batch)
                        batch = []
            if batch:
                client.insert(name, batch)
            # no flush: the counts below read with Strong consistency, and on Milvus Lite a flush
            # seals the restored rows into a segment with BM25 statistics of its own, so chunks
            # written after the restore would rank too low (docs/architecture.md, "BM25 on
            # Milvus Lite"). The rows are in Milvus' log; Lite syncs its log to disk on close,
            # so an OS crash right after a restore is answered by restoring again
        counts = {name: _count(client, name) for name in names}
    except MILVUS_ERRORS as exc:
        raise BackupError(f"restore failed: Milvus: {milvus_message(exc)}") from None
    finally:
        client.close()
    if counts != manifest["counts"]:
        raise BackupError(f"restored row counts {counts} differ from the backup's {manifest['counts']}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.kb.backup", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("create", help="write a snapshot and apply retention")
    make.add_argument("--dest", type=Path, required=True)
    make.add_argument("--keep", type=int, default=7, help="snapshots to keep (newest)")
    listing = sub.add_parser("list", help="snapshots, oldest first")
    listing.add_argument("--dest", type=Path, required=True)
    back = sub.add_parser("restore", help="replace the knowledge base with a snapshot")
    back.add_argument("--dest", type=Path, required=True)
    back.add_argument("--name", default="latest", help="a snapshot directory name, or latest")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for snap in snapshots(args.dest):
                print(snap.name)
            return 0
        site = load_settings()
        settings = site.milvus
        if args.command == "create":
            path = create(settings, args.dest, args.keep)
            print(json.dumps({"backup": str(path), **verify(path)["counts"]}))
            return 0
        available = snapshots(args.dest)
        if not available:
            raise BackupError(f"no snapshots under {args.dest}")
        chosen = available[-1] if args.name == "latest" else args.dest / args.name
        if chosen not in available:
            known = ", ".join(p.name for p in available)
            raise BackupError(f"no snapshot {args.name!r} under {args.dest}; available: {known}")
        counts = restore(settings, chosen, args.dest, site.access)
        print(json.dumps({"restored": chosen.name, **counts}))
        return 0
    except (BackupError, ConfigError, KBError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
