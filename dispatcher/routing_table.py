"""The routing table at runtime: its one owner, GET/PUT /v1/routing, and its file.

The table starts as the config's `routing:`; a table written by `PUT /v1/routing` is kept in
`routing_file` (beside the config file) and wins over the config at the next start. Each
write raises `version`; the ETag is that version, and a PUT with a stale `If-Match` gets 412.
Validation, the version check and the swap happen with no await between them, so two
concurrent writers cannot both win.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError

from rolemesh.errors import BadRequest, Forbidden, InvalidJSON, PreconditionFailed
from rolemesh.http import bearer_token, json_response, read_body
from rolemesh.routing_rules import RoutingTable, unknown_roles

log = structlog.get_logger("dispatcher.routing_table")

MAX_TABLE_BYTES = 1024 * 1024

ORDER = [
    "override:header   X-RoleMesh-Role names the target",
    "override:model    `model` is a model id",
    "content:NAME      the content rules, in order",
    "task_type:TYPE    the task type named (header, metadata, model) or found by a keyword "
    "rule",
    "name              `model` is a role or alias",
    "task_type:TYPE    the classifier's answer, else default_task_type",
]


def etag_of(version: int) -> str:
    return f'"{version}"'


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def parse_table(data: object) -> RoutingTable:
    try:
        return RoutingTable.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(table)'}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()[:8])
        raise BadRequest(f"not a valid routing table: {problems}") from exc


class RoutingTableStore:
    """The one owner of the current table; `replace` is the only way to change it."""

    def __init__(self, table: RoutingTable, path: Path | None) -> None:
        self.table = table
        self.path = path
        self.version = 1
        self.source = "config"

    @classmethod
    def at_start(cls, configured: RoutingTable, path: Path | None) -> RoutingTableStore:
        store = cls(configured, path)
        if path is None or not path.exists():
            return store
        try:
            saved = json.loads(path.read_text())
            store.table = RoutingTable.model_validate(saved["table"])
            store.version = int(saved["version"])
            store.source = "file"
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            # Written atomically, so this is a hand edit gone wrong: say so, keep the config's.
            log.error("routing.file_unreadable", path=str(path), error=str(exc)[:500])
        else:
            log.info("routing.loaded", path=str(path), version=store.version)
        return store

    @property
    def etag(self) -> str:
        return etag_of(self.version)

    def document(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source,
                "file": str(self.path) if self.path else None, "order": ORDER,
                "table": self.table.model_dump(mode="json")}

    def replace(self, table: RoutingTable, *, if_match: str | None, served: Collection[str],
                declared: Iterable[str]) -> None:
        if if_match is not None and if_match.strip() not in (self.etag, "*"):
            raise PreconditionFailed(
                f"the routing table changed meanwhile: If-Match {if_match} but it is now at "
                f"version {self.version} (ETag {self.etag}); GET it again and redo the edit")
        missing = unknown_roles(table, served, declared)
        if missing:
            raise BadRequest(
                f"the routing table names roles no node serves and the config does not "
                f"declare: {', '.join(missing)} (serve them, or list them in declared_roles)")
        version = self.version + 1
        if self.path is not None:
            write_atomically(self.path, json.dumps(
                {"version": version, "table": table.model_dump(mode="json")}, indent=2) + "\n")
        self.table, self.version, self.source = table, version, "api"
        log.info("routing.replaced", version=version, path=str(self.path) if self.path else None,
                 task_types=len(table.task_types), content_rules=len(table.content_rules),
                 keyword_rules=len(table.keyword_rules))


def may_edit(request: web.Request, accepted: Sequence[str]) -> None:
    """Writes need an admin key or the cluster token; a dispatcher with neither refuses them."""
    if not accepted:
        raise Forbidden("editing the routing table needs admin_keys or a cluster_token in "
                        "the dispatcher's config; this one has neither")
    token = bearer_token(request)
    given = token.encode("utf-8", "surrogateescape") if token is not None else b""
    found = False
    for key in accepted:  # every key compared, in constant time each
        found |= secrets.compare_digest(given, key.encode())
    if token is None or not found:
        raise Forbidden("editing the routing table needs an admin key or the cluster token: "
                        "'Authorization: Bearer <key>'")


def table_from_body(body: bytes) -> RoutingTable:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "table" in data and "version" in data:
        data = data["table"]  # a GET's answer sent back as it is, edited
    return parse_table(data)


ROUTING_KEY: web.AppKey[RoutingTableStore] = web.AppKey("routing_table", RoutingTableStore)
# The names PUT checks a table against: what the cluster serves, and the config's aliases.
SERVED_KEY: web.AppKey[Callable[[], tuple[Collection[str], Iterable[str]]]] = \
    web.AppKey("routing_served", Callable)  # type: ignore[arg-type]
EDITORS_KEY: web.AppKey[tuple[str, ...]] = web.AppKey("routing_editors", tuple)


async def get_routing(request: web.Request) -> web.Response:
    store = request.app[ROUTING_KEY]
    return json_response(store.document(), extra_headers={"ETag": store.etag})


async def put_routing(request: web.Request) -> web.Response:
    editors: tuple[str, ...] = request.app[EDITORS_KEY]
    may_edit(request, editors)
    store = request.app[ROUTING_KEY]
    table = table_from_body(await read_body(request, MAX_TABLE_BYTES))
    served, declared = request.app[SERVED_KEY]()
    store.replace(table, if_match=request.headers.get("If-Match"), served=served,
                  declared=declared)
    return json_response(store.document(), extra_headers={"ETag": store.etag})
