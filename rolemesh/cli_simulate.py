"""`rolemesh simulate`: what a cluster, a trace and a policy would cost, in simulated time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rolemesh.config_loading import ConfigError
from rolemesh.simulate.cluster import ClusterFile, Loads, load_cluster_file
from rolemesh.simulate.engine import simulate
from rolemesh.simulate.report import Summary, json_lines, markdown_table, ratio_table, summarize
from rolemesh.simulate.routers import POLICIES, RoleMesh
from rolemesh.simulate.trace import SYNTHETIC, Trace, log_files, read_access_log, synthetic

DESCRIPTION = """\
Replay requests in simulated time against a cluster you describe, with RoleMesh's real
decision and today's node-agent rules, and with baselines in the same world: no
processes, no GPUs, a few seconds per run."""

EPILOG = """\
the cluster file (YAML; examples/simulate/three-gpus.yaml is a full example):
  models:                          # node-agent model fields, or this shorthand
    - model_id: coder-7b
      roles: [coder]
      size_gb: 4.7                 # load time = base_s + slope x size (warm or cold)
      memory_need_mb: 6800         # default: size x 1.15
      tokens_per_s: 60             # decode, shared by the parallel slots
      prefill_tokens_per_s: 1800
      parallel: 1
      output_tokens: {mean: 400, sigma: 0.8}   # lognormal answer lengths
  nodes:
    - node_id: box-a
      devices: [{device_id: "gpu:0", memory_mb: 24576, speed: 1.0}]
  pins: [{model: coder-7b, node: box-a, device: "gpu:0"}]   # resident at the start
  loads: warm                      # and load_time, agent, dispatcher, client: see docs

traces (--trace, seeded; --requests sets their size):
  steady    Poisson arrivals, Zipf popularity over the roles
  bursts    a calm mix with bursts of 8-16 requests for one role
  agents    agents in closed loops alternating planner -> coder
  overload  a calm mix; in its middle third the top role at 1.8x one device's throughput
  drift     a Zipf mix whose ranking turns every quarter
  one-gpu   a Zipf mix on the cluster's first device alone
  all       every one of the above
  or replay the dispatcher's access log: --access-log PATH (its rotated backups too)

policies (--policy): rolemesh (its real choose() and the node agent's own per-device
  rules), llama-swap (an operator map that knows the traffic), floor (every model
  resident everywhere: the best possible), ollama, least-loaded, round-robin.

reading the table: one row per trace and policy; with several seeds each cell is
  "median (min-max)". loads: model loads; load GPU-s: device time spent loading;
  p50/p95/p99 s: latency from the first attempt to the last token of answered requests;
  TTFT: to the first token; rejected: a 503 after the client's retries (for rolemesh:
  past the dispatcher's max_buffered_requests); timed out: still queued after the agent's
  queue timeout, or held at the dispatcher past its buffer_timeout_s. Rejected and
  timed-out requests are not in the percentiles: read them together, or read "p95 all
  s", the p95 over every request with the unanswered ones as never answered (inf when
  over 5 %). The second table gives RoleMesh's figures as ratios against the operator map
  and the floor (below 1x: RoleMesh is better).

examples:
  rolemesh simulate --cluster examples/simulate/three-gpus.yaml --trace all --seeds 1 2 3
  rolemesh simulate --cluster my.yaml --access-log /var/log/rolemesh/access.jsonl \\
      --policy rolemesh,llama-swap,floor --loads cold --jsonl results.jsonl"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate", help="replay a trace against a described cluster, in simulated time",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", type=Path, required=True, help="the cluster file (YAML)")
    p.add_argument("--trace", default="steady",
                   help="a synthetic trace, a comma-separated list, or 'all' "
                        "(default %(default)s)")
    p.add_argument("--access-log", type=Path, default=None,
                   help="replay this dispatcher access log instead of a synthetic trace")
    p.add_argument("--policy", default="all",
                   help=f"comma-separated, or 'all' ({', '.join(POLICIES)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[1],
                   help="seeds for the synthetic traces (default 1)")
    p.add_argument("--requests", type=int, default=2000,
                   help="about how many requests a synthetic trace has (default %(default)s)")
    p.add_argument("--loads", choices=["warm", "cold", "both"], default=None,
                   help="warm page cache or cold disk loads (default: the cluster file's)")
    p.add_argument("--cost-model", action="append", default=[], metavar="NAME=VALUE",
                   help="override one of the cost model's weights for rolemesh (repeatable): "
                        "load_weight, copy_regret_weight, regret_horizon_s, "
                        "default_service_s, idle_load_weight; default: the cluster file's "
                        "dispatcher.cost_model")
    p.add_argument("--jsonl", type=Path, default=None,
                   help="also write one JSON line per run here ('-': stdout, no table)")


def _names(value: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    if value == "all":
        return list(known)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or value!r}; one of "
                         f"{', '.join(known)} or 'all'")
    return names


def _traces(args: argparse.Namespace, cluster: ClusterFile) -> list[tuple[int | None, Trace]]:
    if args.access_log is not None:
        files = log_files(args.access_log)
        if not files:
            raise ValueError(f"{args.access_log}: no such access log")
        return [(None, read_access_log(files))]
    if args.requests < 1:
        raise ValueError("--requests must be at least 1")
    return [(seed, synthetic(name, cluster, seed, args.requests))
            for name in _names(args.trace, list(SYNTHETIC), "trace") for seed in args.seeds]


def with_cost_model(cluster: ClusterFile, settings: list[str]) -> ClusterFile:
    """The cluster with `--cost-model NAME=VALUE` settings over its dispatcher's weights."""
    if not settings:
        return cluster
    cost_model = cluster.dispatcher.cost_model.overridden(settings)
    dispatcher = cluster.dispatcher.model_copy(update={"cost_model": cost_model})
    return cluster.model_copy(update={"dispatcher": dispatcher})


def run(args: argparse.Namespace) -> int:
    try:
        cluster = with_cost_model(load_cluster_file(args.cluster), args.cost_model)
        policies = _names(args.policy, POLICIES, "policy")
        traces = _traces(args, cluster)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"rolemesh simulate: {exc}", file=sys.stderr)
        return 2
    kinds: list[Loads] = (["warm", "cold"] if args.loads == "both"
                          else [args.loads or cluster.loads])
    summaries: list[Summary] = []
    for kind in kinds:
        for seed, trace in traces:
            for policy in policies:
                summaries.append(summarize(simulate(cluster, policy, trace, loads=kind,
                                                    seed=seed)))
    lines = json_lines(summaries)
    if args.jsonl is not None and str(args.jsonl) == "-":
        sys.stdout.write(lines)
        return 0
    if args.jsonl is not None:
        args.jsonl.write_text(lines)
    if any(p.startswith("rolemesh") for p in policies):
        weights = ", ".join(f"{k} {v:g}" for k, v in
                            cluster.dispatcher.cost_model.model_dump().items() if v is not None)
        print(f"rolemesh: the agent's rules are {RoleMesh(cluster).agent_rules}; "
              f"cost model: {weights}\n")
    print(markdown_table(summaries))
    if "rolemesh" in policies and {"llama-swap", "floor"} & set(policies):
        baselines = [b for b in ("llama-swap", "floor") if b in policies]
        print()
        print(ratio_table(summaries, baselines))
    skipped = sum(t.skipped_lines for _, t in traces)
    if skipped:
        print(f"\n{skipped} access log lines were not requests and were skipped",
              file=sys.stderr)
    return 0
