"""`rolemesh simulate` as a user runs it: traces, cluster files, determinism, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rolemesh.cli import main
from rolemesh.config_loading import ConfigError
from rolemesh.simulate.cluster import load_cluster, load_cluster_file
from rolemesh.simulate.engine import simulate
from rolemesh.simulate.report import summarize
from rolemesh.simulate.routers import POLICIES
from rolemesh.simulate.trace import SYNTHETIC, log_files, read_access_log, synthetic

EXAMPLE = Path(__file__).parents[2] / "examples" / "simulate" / "three-gpus.yaml"


@pytest.fixture(scope="module")
def cluster():
    return load_cluster_file(EXAMPLE)


@pytest.mark.parametrize("trace", sorted(SYNTHETIC))
def test_every_trace_and_policy_accounts_for_every_request(cluster, trace):
    t = synthetic(trace, cluster, 1, 300)
    for policy in POLICIES:
        s = summarize(simulate(cluster, policy, t))
        assert s.requests == t.calls
        assert s.ok + s.rejected + s.timed_out + s.unservable == s.requests
        assert s.ok
        if policy == "floor":
            assert s.loads == 0


def test_the_same_seed_gives_the_same_figures_and_another_seed_others(cluster):
    def figures(seed: int) -> list:
        return [summarize(simulate(cluster, p, synthetic("bursts", cluster, seed, 300),
                                   seed=seed)) for p in ("rolemesh", "ollama")]
    assert figures(7) == figures(7)
    assert [(s.p95_s, s.loads) for s in figures(7)] != [(s.p95_s, s.loads) for s in figures(8)]


def test_agents_alternate_planner_then_coder(cluster):
    t = synthetic("agents", cluster, 1, 200)
    assert t.sessions
    assert not t.arrivals
    for s in t.sessions:
        assert [c.name for c in s.calls[:4]] == ["planner", "coder", "planner", "coder"]


def test_the_overload_window_is_its_top_role_in_the_middle_third(cluster):
    t = synthetic("overload", cluster, 1, 1000)
    end = t.arrivals[-1].t
    top = Counter(a.call.name for a in t.arrivals).most_common(1)[0][0]
    middle = [a for a in t.arrivals if end / 3 <= a.t < 2 * end / 3]
    outside = [a for a in t.arrivals if not end / 3 <= a.t < 2 * end / 3]
    share = sum(a.call.name == top for a in middle) / len(middle)
    assert share > 0.7
    assert len(middle) > len(outside) / 2  # busier than an average third


def test_the_one_gpu_trace_runs_on_the_first_device_alone(cluster):
    run = simulate(cluster, "rolemesh", synthetic("one-gpu", cluster, 1, 200))
    assert set(run.devices) == {("box-a", "gpu:0")}


def test_an_access_log_and_its_backups_replay_oldest_first(tmp_path):
    log = tmp_path / "access.jsonl"
    (tmp_path / "access.jsonl.2").write_text(json.dumps({"ts": 100.0, "model": "a"}) + "\n")
    (tmp_path / "access.jsonl.1").write_text(
        json.dumps({"ts": 101.5, "model": "b", "completion_tokens": 7}) + "\nnot json\n")
    log.write_text(json.dumps({"ts": 103.0, "model": "a", "prompt_tokens": 12}) + "\n")
    trace = read_access_log(log_files(log))
    assert [(a.t, a.call.name) for a in trace.arrivals] == [(0.0, "a"), (1.5, "b"), (3.0, "a")]
    assert trace.arrivals[1].call.completion_tokens == 7
    assert trace.arrivals[2].call.prompt_tokens == 12
    assert trace.skipped_lines == 1


def test_a_cluster_file_error_names_the_key():
    with pytest.raises(ConfigError, match=r"models\.0\.speed: unknown key"):
        load_cluster("models: [{model_id: m, size_gb: 1, speed: 3}]\n"
                     "nodes: [{node_id: n, devices: [{device_id: cpu}]}]")
    with pytest.raises(ConfigError, match="give size_gb or memory_need_mb"):
        load_cluster("models: [{model_id: m}]\nnodes: [{node_id: n, devices: [{device_id: cpu}]}]")


def test_node_agent_model_fields_are_accepted_in_a_cluster_file():
    c = load_cluster("models: [{model_id: m, size_gb: 1, ctx_size: 4096, gpu_layers: 99, "
                     "server_args: {--seed: 1}}]\n"
                     "nodes: [{node_id: n, devices: [{device_id: cpu}]}]")
    assert c.models[0].agent == {"gpu_layers": 99, "server_args": {"--seed": 1}}


def test_help_shows_how_to_describe_a_cluster_pick_a_trace_and_read_the_table(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    for words in ("the cluster file", "memory_mb", "tokens_per_s", "--access-log", "overload",
                  "reading the table", "median (min-max)", "llama-swap", "floor"):
        assert words in out


def test_the_cli_prints_a_table_per_trace_and_policy_and_json_lines(capsys, tmp_path):
    out_file = tmp_path / "runs.jsonl"
    assert main(["simulate", "--cluster", str(EXAMPLE), "--trace", "steady,agents",
                 "--requests", "150", "--seeds", "1", "2", "--policy", "rolemesh,llama-swap,floor",
                 "--jsonl", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "| steady (warm) | rolemesh |" in out
    assert "| agents (warm) | floor |" in out
    assert "loads vs llama-swap" in out  # the ratio table
    runs = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(runs) == 2 * 2 * 3
    assert {r["seed"] for r in runs} == {1, 2}


def test_an_unknown_policy_is_a_clear_error(capsys):
    assert main(["simulate", "--cluster", str(EXAMPLE), "--policy", "magic"]) == 2
    assert "unknown policy 'magic'" in capsys.readouterr().err


def test_the_cost_model_can_be_set_for_a_run_and_the_table_says_which_ran(capsys, tmp_path):
    # Loads weighted 1,000x: agents asking at once wait for one copy each of planner and
    # coder instead of loading more (the default makes copies: lower p95, more loads).
    runs = {}
    for weight in ("4", "1000"):
        out_file = tmp_path / f"{weight}.jsonl"
        assert main(["simulate", "--cluster", str(EXAMPLE), "--trace", "agents",
                     "--requests", "300", "--policy", "rolemesh", "--cost-model",
                     f"load_weight={weight}", "--jsonl", str(out_file)]) == 0
        assert f"cost model: default_service_s 10, load_weight {weight}," in \
            capsys.readouterr().out
        (runs[weight],) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert runs["1000"]["loads"] == 2
    assert runs["4"]["loads"] > 2
    assert runs["4"]["p95_s"] < runs["1000"]["p95_s"]


def test_a_bad_cost_model_setting_is_a_clear_error(capsys):
    assert main(["simulate", "--cluster", str(EXAMPLE), "--cost-model", "load_weight=-1"]) == 2
    assert "load_weight: Input should be greater than or equal to 0" in capsys.readouterr().err
