"""tiny_gguf's mixture-of-experts and padded-vocabulary models, and llama.cpp's log lines."""

from __future__ import annotations

import pytest

from rolemesh.llama_memory_log import parse_memory_log
from rolemesh.memory_estimate import read_gguf_facts
from rolemesh.tiny_gguf import LETTERS, N_VOCAB, write_tiny_model


def test_a_moe_model_has_a_router_and_stacked_experts_per_layer(tmp_path):
    path = write_tiny_model(tmp_path / "moe.gguf", charset=LETTERS, n_embd=64, n_layer=2,
                            n_ff=96, n_expert=4, n_expert_used=2)
    facts = read_gguf_facts(path)
    assert (facts.n_expert, facts.n_expert_used) == (4, 2)
    dims = {t.name: t.dims for t in facts.tensors}
    assert dims["blk.1.ffn_gate_inp.weight"] == (64, 4)
    assert dims["blk.1.ffn_gate_exps.weight"] == (64, 96, 4)
    assert dims["blk.1.ffn_up_exps.weight"] == (64, 96, 4)
    assert dims["blk.1.ffn_down_exps.weight"] == (96, 64, 4)
    assert "blk.0.ffn_gate.weight" not in dims
    assert sum(t.padded_nbytes for t in facts.tensors) < path.stat().st_size


def test_a_padded_vocabulary_grows_embedding_and_output(tmp_path):
    facts = read_gguf_facts(write_tiny_model(tmp_path / "v.gguf", charset=LETTERS,
                                             n_vocab=5000))
    dims = {t.name: t.dims for t in facts.tensors}
    assert facts.n_vocab == 5000
    assert dims["token_embd.weight"] == dims["output.weight"] == (64, 5000)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_expert": 4, "n_expert_used": 5}, "n_expert_used"),
    ({"n_expert": 4, "n_expert_used": 0}, "n_expert_used"),
    ({"n_vocab": N_VOCAB - 1}, "n_vocab"),
])
def test_impossible_shapes_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_tiny_model(tmp_path / "x.gguf", charset=LETTERS, **kwargs)


LOG = """\
0.00.009.535 I load_tensors:   CPU_Mapped model buffer size =     5.64 MiB
0.00.009.536 I load_tensors:        CUDA0 model buffer size =  1200.50 MiB
0.00.009.851 I llama_context:        CPU  output buffer size =     0.12 MiB
0.00.009.890 I llama_kv_cache:        CPU KV buffer size =     1.00 MiB
0.00.009.891 I llama_kv_cache:      CUDA0 KV buffer size =     3.00 MiB
0.00.010.238 I llama_kv_cache: size =    4.00 MiB (   512 cells,   4 layers,  2/2 seqs), K ...
0.00.011.494 I sched_reserve:        CPU compute buffer size =     7.14 MiB
0.00.011.495 I sched_reserve:      CUDA0 compute buffer size =    20.00 MiB
"""


def test_llama_cpps_buffer_lines_are_read_per_buffer():
    figures = parse_memory_log(LOG)
    assert figures.model_mib == {"CPU_Mapped": 5.64, "CUDA0": 1200.5}
    assert figures.kv_mib == {"CPU": 1.0, "CUDA0": 3.0}
    assert figures.compute_mib == {"CPU": 7.14, "CUDA0": 20.0}
    assert figures.output_mib == {"CPU": 0.12}
    assert figures.kv_cells == 512
    assert figures.complete
    assert not parse_memory_log("llama_server: model loaded").complete
