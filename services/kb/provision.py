"""``python -m services.kb.provision``: prepare Milvus for the knowledge base (run by Ansible).

Creates (or validates) the knowledge-base collections with the same code the gateway
uses (:class:`~services.kb.store.KnowledgeStore`), so the schema has one definition.
On a Milvus that enforces authentication it also, idempotently:

- changes the ``root`` password from Milvus' well-known default, and
- creates an application user whose role may only search, query, insert and delete
  in the knowledge-base collections -- what the gateway and the sync consumer need.

Milvus Lite has no users or roles (its RPCs answer UNIMPLEMENTED and accept any
password); that is reported as ``"rbac": "unavailable"`` so the playbook can say the
firewall is the only guard. Passwords come as JSON on standard input (``--secrets-stdin``:
``{"root_password": ..., "app_password": ...}``) -- never the command line or the
environment, which other local users and sudo's logs can see. The last line on stdout is a
JSON report whose ``changed`` flag Ansible uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from pymilvus import MilvusClient, MilvusException

from services.config import ConfigError, load_settings
from services.kb import schema
from services.kb.errors import KBError

DEFAULT_ROOT_PASSWORD = "Milvus"  # noqa: S105 -- Milvus' published default, replaced here
APP_ROLE = "dualtrack_kb_app"
APP_PRIVILEGE_GROUP = "CollectionReadWrite"
"""Milvus 2.5's built-in group: describe, load, search, query, insert, delete... on one collection
(granted with ``grant_privilege_v2``; the legacy per-privilege API files DescribeCollection as global)."""
_UNIMPLEMENTED = ("unimplemented", "not implemented", "unsupported")


@dataclass
class Report:
    changed: bool = False
    collection: str = ""
    rbac: str = "unavailable"
    actions: list[str] = field(default_factory=list)
    message: str = ""


def _unimplemented(exc: Exception) -> bool:
    text = f"{getattr(exc, 'message', '')} {exc}".lower()
    return any(word in text for word in _UNIMPLEMENTED)


def rbac_supported(client: MilvusClient) -> bool:
    """False on Milvus Lite (user management answers UNIMPLEMENTED)."""
    try:
        client.list_users()
    except Exception as exc:
        if _unimplemented(exc):
            return False
        raise
    return True


def ensure_root_password(uri: str, new_password: str, report: Report) -> str:
    """Log in as root with ``new_password``, first replacing the default one if needed."""
    try:
        MilvusClient(uri=uri, token=f"root:{new_password}").list_users()
        return new_password
    except MilvusException:
        pass
    MilvusClient(uri=uri, token=f"root:{DEFAULT_ROOT_PASSWORD}").update_password(
        "root", DEFAULT_ROOT_PASSWORD, new_password
    )
    report.changed = True
    report.actions.append("root password changed from the default")
    return new_password


def ensure_app_user(
    client: MilvusClient, user: str, password: str, collections: list[str], report: Report
) -> None:
    """The application user, limited to the knowledge-base collections."""
    if user not in client.list_users():
        client.create_user(user_name=user, password=password)
        report.changed = True
        report.actions.append(f"user {user} created")
    else:
        # the password in the vault is the truth: re-set it (Milvus does not reveal whether it differs)
        client.update_password(user, password, password)
    if APP_ROLE not in client.list_roles():
        client.create_role(role_name=APP_ROLE)
        report.changed = True
        report.actions.append(f"role {APP_ROLE} created")
    granted = {
        (g.get("object_name"), g.get("privilege"))
        for g in client.describe_role(role_name=APP_ROLE).get("privileges", [])
    }
    for name in collections:
        if (name, APP_PRIVILEGE_GROUP) not in granted:
            client.grant_privilege_v2(
                role_name=APP_ROLE, privilege=APP_PRIVILEGE_GROUP, collection_name=name, db_name="default"
            )
            report.changed = True
            report.actions.append(f"{APP_PRIVILEGE_GROUP} on {name} granted")
    if APP_ROLE not in client.describe_user(user_name=user).get("roles", ()):
        client.grant_role(user_name=user, role_name=APP_ROLE)
        report.changed = True
        report.actions.append(f"role {APP_ROLE} given to {user}")


def provision(
    app_user: str | None,
    dimension: int | None,
    root_password: str | None = None,
    app_password: str | None = None,
) -> Report:
    from services.kb.store import KnowledgeStore

    settings = load_settings()
    uri = settings.milvus.uri
    report = Report(collection=settings.milvus.collection)
    probe = MilvusClient(uri=uri, token=f"root:{root_password or DEFAULT_ROOT_PASSWORD}")
    token = ""
    if rbac_supported(probe):
        if not root_password:
            raise KBError(
                "this Milvus enforces users: set DUALTRACK_PROVISION_ROOT_PASSWORD (milvus_root_password)"
            )
        token = f"root:{ensure_root_password(uri, root_password, report)}"
        report.rbac = "enforced"
    client = MilvusClient(uri=uri, token=token)
    before = set(client.list_collections())
    if client.has_collection(settings.milvus.collection):  # served through an alias once rebuilt
        before.add(settings.milvus.collection)
    if dimension is None and client.has_collection(settings.milvus.collection):  # or its alias
        # an existing collection says its own size: no need to load the model on every re-run
        # (the gateway still checks the model against it when it starts)
        fields = client.describe_collection(settings.milvus.collection)["fields"]
        dimension = next(int(f["params"]["dim"]) for f in fields if f["name"] == schema.VECTOR)
    if dimension is None:
        from services.kb.embedder import Embedder

        dimension = Embedder(settings.embedding).dimension
    admin = settings.milvus.model_copy(update={"token": token or None})
    store = KnowledgeStore(admin, dimension)
    store.connect()
    store.ensure_ledger()  # knowledge sync's ledger: created here, where the admin may create
    store.close()
    names = [
        settings.milvus.collection,
        schema.registry_name(settings.milvus.collection),
        schema.ledger_name(settings.milvus.collection),
    ]
    created = set(names) - before
    if created:
        report.changed = True
        report.actions.append(f"collections created: {', '.join(sorted(created))}")
    if report.rbac == "enforced" and app_user:
        if not app_password:
            raise KBError(
                "set DUALTRACK_PROVISION_APP_PASSWORD (milvus_app_password) for the application user"
            )
        ensure_app_user(MilvusClient(uri=uri, token=token), app_user, app_password, names, report)
    if report.rbac == "unavailable":
        report.message = (
            "Milvus Lite has no users or roles: any client that reaches its port can read and write "
            "every collection -- the firewall's allowlist is the only guard"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.kb.provision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--app-user", help="application user to create where Milvus enforces RBAC")
    parser.add_argument("--dimension", type=int, help="vector size (default: load the embedding model)")
    parser.add_argument("--secrets-stdin", action="store_true", help="read passwords as JSON from stdin")
    args = parser.parse_args(argv)
    secrets: dict[str, str] = {}
    if args.secrets_stdin:
        try:
            secrets = json.loads(sys.stdin.read() or "{}")
        except ValueError:
            print(json.dumps({"failed": True, "msg": "--secrets-stdin: standard input is not JSON"}))
            return 1
    try:
        report = provision(
            args.app_user,
            args.dimension,
            secrets.get("root_password") or None,
            secrets.get("app_password") or None,
        )
    except (ConfigError, KBError, MilvusException) as exc:
        print(json.dumps({"failed": True, "msg": str(getattr(exc, "message", exc))}))
        return 1
    out: dict[str, Any] = asdict(report)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
