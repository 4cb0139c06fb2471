"""The access log's config and how it finds token counts in an answer."""

from __future__ import annotations

import json

import pytest

from dispatcher.access_log import AccessLogConfig, _Tokens
from dispatcher.config import DispatcherConfig
from rolemesh.config_loading import ConfigError, load_config


def test_the_access_log_is_off_unless_configured():
    assert DispatcherConfig().access_log is None


def test_a_configured_access_log_rotates_by_default():
    config = load_config("access_log: {path: /tmp/x.jsonl}", DispatcherConfig)
    assert config.access_log == AccessLogConfig(path="/tmp/x.jsonl", max_bytes=64 * 1024 * 1024,
                                                backups=5)


def test_an_unknown_access_log_key_is_an_error_that_names_it():
    with pytest.raises(ConfigError, match=r"access_log\.size: unknown key"):
        load_config("access_log: {path: a.jsonl, size: 3}", DispatcherConfig)


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"


def test_a_stream_counts_tokens_from_its_last_usage_chunk():
    tokens = _Tokens()
    tokens.tail += sse({"choices": [{"delta": {"content": "a"}}], "usage": None},
                       {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    assert tokens.usage() == {"prompt_tokens": 7, "completion_tokens": 3}


def test_a_stream_without_usage_counts_nothing():
    tokens = _Tokens()
    tokens.tail += sse({"choices": [{"delta": {"content": "a"}}]})
    assert tokens.usage() is None


def test_a_buffered_answer_counts_its_usage():
    tokens = _Tokens()
    tokens.body = json.dumps({"choices": [], "usage": {"prompt_tokens": 2,
                                                        "completion_tokens": 9}}).encode()
    assert tokens.usage() == {"prompt_tokens": 2, "completion_tokens": 9}


def test_an_access_log_that_cannot_be_written_fails_at_start_naming_the_path(tmp_path):
    from dispatcher.access_log import AccessLog

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    log = AccessLog(AccessLogConfig(path=blocker / "access.jsonl"))
    with pytest.raises(OSError, match=r"access_log\.path: cannot write .*a-file/access\.jsonl"):
        log.start()
    log.close()
