"""What a node may register as."""

from __future__ import annotations

import pytest

from dispatcher.node_urls import node_id_problem, node_url_problem


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8081", "https://gpu-host.lan:9000", "http://10.0.0.5:8081",
    "http://[::1]:8081", "http://gpu-box:8081/",
])
def test_ordinary_node_urls_are_accepted(url):
    assert node_url_problem(url) is None


@pytest.mark.parametrize(("url", "words"), [
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://169.254.1.1:80", "link-local"),
    ("http://[fe80::1]:80", "link-local"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://METADATA.google.internal./", "metadata"),
    ("http://user:pass@host:8081/", "user:password"),
    ("http://user@host:8081/", "user:password"),
    ("http://host:8081/a b", "spaces"),
    ("http://host:8081/\x00", "control"),
    ("", "empty"),
    ("ftp://host:21", "http(s)"),
    ("http://:8081", "URL"),
])
def test_unsafe_or_malformed_node_urls_are_refused_with_the_reason(url, words):
    problem = node_url_problem(url)
    assert problem is not None
    assert words in problem


def test_unsafe_urls_register_when_the_config_allows_them():
    assert node_url_problem("http://user:pass@169.254.169.254:80", allow_unsafe=True) is None
    assert node_url_problem("http://host:8081/a b", allow_unsafe=True) is not None


@pytest.mark.parametrize(("node_id", "ok"), [("node-a", True), ("gpu.box_1", True),
                                             ("", False), ("a b", False), ("a\tb", False),
                                             ("a\x00", False)])
def test_node_ids_must_be_non_empty_and_without_spaces(node_id, ok):
    assert (node_id_problem(node_id) is None) is ok
