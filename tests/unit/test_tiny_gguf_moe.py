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


# -- the vision projector ------------------------------------------------------------------------

def test_a_tiny_projector_is_a_clip_file_sized_by_its_tensor_table(tmp_path):
    from rolemesh.projector_memory import (
        projector_bytes,
        projector_compute_bytes,
        read_projector_facts,
    )
    from rolemesh.tiny_gguf import write_tiny_projector

    path = write_tiny_projector(tmp_path / "mmproj.gguf", text_n_embd=64, n_embd=128,
                                n_layer=2, n_ff=512, image_size=112, patch_size=14)
    facts = read_projector_facts(path)
    assert (facts.image_tokens, facts.n_embd, facts.n_ff, facts.projection_dim,
            facts.n_layer) == (65, 128, 512, 64, 2)
    assert facts.weights_bytes <= path.stat().st_size
    assert projector_compute_bytes(facts) == 65 * (11 * 128 + 5 * 512)
    assert projector_bytes(path) == facts.weights_bytes + projector_compute_bytes(facts)


def test_a_text_model_is_not_a_projector(tmp_path):
    from rolemesh.memory_estimate import NotAGGUFFile
    from rolemesh.projector_memory import read_projector_facts

    with pytest.raises(NotAGGUFFile, match="not a projector"):
        read_projector_facts(write_tiny_model(tmp_path / "m.gguf", charset=LETTERS))


def test_a_projector_whose_image_does_not_tile_is_refused(tmp_path):
    from rolemesh.tiny_gguf import write_tiny_projector

    with pytest.raises(ValueError, match="multiple of patch_size"):
        write_tiny_projector(tmp_path / "x.gguf", text_n_embd=64, image_size=100)


def test_projector_log_lines_are_read():
    figures = parse_memory_log("0.1 I load_hparams: model size:         3.48 MiB\n"
                               "0.2 I reserve_compute_meta:        CPU compute buffer size ="
                               "     1.58 MiB\n")
    assert figures.projector_model_mib == 3.48
    assert figures.projector_compute_mib == {"CPU": 1.58}
