"""Battery 10: canary secrets (cluster token, api key) and a canary prompt never show in a
log line at the default level, in any process's argv, or in a llama-server's environment."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import psutil

from tests.battery.harness import (
    API_KEY,
    TOKEN,
    AgentSpec,
    chat,
    fake_models,
    one_stream,
    start_battery,
)

PROMPT = "canary-prompt-5e1f: the launch codes are 0000"


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_canary_secrets_and_prompts_stay_out_of_logs_argv_and_child_environments(
        tmp_path, tiny_models, fake_llama_server_bin):
    specs = [AgentSpec(n, [fake_models("letters", tiny_models["letters"], ["chat"],
                                       tmp_path / f"{n}-spawns.jsonl")])
             for n in ("node-a", "node-b")]
    with start_battery(tmp_path, fake_llama_server_bin, specs, token_from_env=True,
                       env={"ROLEMESH_API_KEY": API_KEY}) as c:
        url, headers = c.dispatcher.url, c.headers()
        async with aiohttp.ClientSession() as s:
            ok = await one_stream(s, url, chat("chat", prompt=PROMPT), headers)
            assert ok.kind() == "done"
            plain = await one_stream(s, url, chat("chat", stream=False, prompt=PROMPT), headers)
            assert plain.status == 200
            # Failures log more: a wrong key, an unknown model, a bad body, a direct call.
            wrong = await one_stream(s, url, chat("chat", prompt=PROMPT),
                                     {"Authorization": f"Bearer {TOKEN}x"})
            assert wrong.status == 401
            unknown = await one_stream(s, url, chat("no-such-model", prompt=PROMPT), headers)
            assert unknown.status == 404
            async with s.post(url + "/v1/chat/completions", headers=headers,
                              data=f'{{"model": "chat", "messages": "{PROMPT}'.encode()) as r:
                assert r.status == 400
            direct = await one_stream(s, c.agents["node-a"].url, chat("chat", prompt=PROMPT),
                                      {"Authorization": f"Bearer {TOKEN}"})
            assert direct.kind() == "done"
        children = c.live_llama_servers()
        assert children  # there are children to look at
        logs = c.logs()
        assert "request.done" in logs  # the logs are there to look at
        for canary in (TOKEN, API_KEY, PROMPT, "launch codes"):
            assert canary not in logs, canary
            for pid in [c.dispatcher.proc.pid, *(a.proc.pid for a in c.agents.values()),
                        *children]:
                assert canary.encode() not in cmdline(pid), (canary, pid)
        for pid in children:
            env = environ(pid)
            assert TOKEN.encode() not in env
            assert API_KEY.encode() not in env
        # The agents did get the token from the environment (they registered with it).
        assert TOKEN.encode() in environ(c.agents["node-a"].proc.pid)
        assert psutil.Process(c.agents["node-a"].proc.pid).is_running()
