"""`rolemesh simulate`: replay requests in simulated time against a described cluster.

RoleMesh's real decision (`rolemesh.decision.choose`) runs unchanged on views built from a
simulated world; a model of llama-server (load time, prefill, decode shared by parallel
slots, output lengths) stands in for the processes. Baselines run in the same world.

Modules, one job each:
- `cluster`  the cluster file: nodes, devices, models, pins, load-time slopes;
- `world`    the timing model of one model on one device;
- `trace`    requests: seeded synthetic traces and the dispatcher's access log;
- `planners` per-device policies (today's node agent, FIFO, Ollama-like, ...);
- `device`   one simulated device executing its planner's actions;
- `views`    the simulated cluster as the decision's `DeviceView`s;
- `routers`  cluster policies: RoleMesh's choose() and the baselines;
- `engine`   the event loop in simulated time;
- `report`   per run figures, the markdown table and JSON lines.
"""
