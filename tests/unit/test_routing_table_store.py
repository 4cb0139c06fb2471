"""The live routing table: versions, If-Match, validation of names, the file it is kept in."""

from __future__ import annotations

import json
import os

import pytest

from dispatcher.routing_table import RoutingTableStore, parse_table, write_atomically
from rolemesh.errors import BadRequest, PreconditionFailed
from rolemesh.routing_rules import RoutingTable

SERVED = {"architect", "builder"}
CONFIGURED = RoutingTable.model_validate({"task_types": {"planning": "architect"}})
NEW = RoutingTable.model_validate({"task_types": {"planning": "builder"}})


def test_a_write_raises_the_version_and_is_kept_in_the_file(tmp_path):
    path = tmp_path / "d.routing.json"
    store = RoutingTableStore.at_start(CONFIGURED, path)
    assert (store.version, store.source, store.etag) == (1, "config", '"1"')
    store.replace(NEW, if_match='"1"', served=SERVED, declared=())
    assert (store.version, store.source, store.table) == (2, "api", NEW)
    saved = json.loads(path.read_text())
    assert saved == {"version": 2, "table": NEW.model_dump(mode="json")}
    again = RoutingTableStore.at_start(CONFIGURED, path)
    assert (again.version, again.source, again.table) == (2, "file", NEW)


def test_a_stale_if_match_changes_nothing(tmp_path):
    store = RoutingTableStore.at_start(CONFIGURED, tmp_path / "t.json")
    store.replace(NEW, if_match=None, served=SERVED, declared=())
    with pytest.raises(PreconditionFailed, match='now at version 2'):
        store.replace(CONFIGURED, if_match='"1"', served=SERVED, declared=())
    assert store.table == NEW
    store.replace(CONFIGURED, if_match="*", served=SERVED, declared=())
    assert store.version == 3


def test_a_table_naming_unknown_roles_is_refused_naming_them_and_not_written(tmp_path):
    path = tmp_path / "t.json"
    store = RoutingTableStore.at_start(CONFIGURED, path)
    bad = RoutingTable.model_validate({"task_types": {"a": "ghost", "b": "builder"},
                                       "fallbacks": {"builder": ["phantom"]}})
    with pytest.raises(BadRequest, match="ghost, phantom"):
        store.replace(bad, if_match=None, served=SERVED, declared=())
    assert not path.exists()
    store.replace(bad, if_match=None, served=SERVED, declared=["ghost", "phantom"])
    assert store.version == 2


def test_an_unreadable_file_leaves_the_config_table_in_force(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    store = RoutingTableStore.at_start(CONFIGURED, path)
    assert (store.table, store.source, store.version) == (CONFIGURED, "config", 1)


def test_without_a_file_the_table_lives_in_memory_only():
    store = RoutingTableStore.at_start(CONFIGURED, None)
    store.replace(NEW, if_match=None, served=SERVED, declared=())
    assert store.document()["file"] is None


def test_an_atomic_write_leaves_no_temp_file_and_replaces_the_whole_file(tmp_path):
    path = tmp_path / "sub" / "t.json"
    write_atomically(path, "one\n")
    write_atomically(path, "two\n")
    assert path.read_text() == "two\n"
    assert os.listdir(path.parent) == ["t.json"]


def test_an_invalid_table_names_each_key_and_problem():
    with pytest.raises(BadRequest) as err:
        parse_table({"task_types": {"x": "y"}, "content_rules": [{"name": "a", "when": {
            "images": "maybe"}, "role": "v"}], "colour": "red"})
    message = str(err.value)
    assert "content_rules.0.when.images" in message
    assert "colour" in message
