"""Memory stays flat over many generations in one process (issue 20): after a warm-up, the Python heap (what
tracemalloc sees: caches, records, reports, patches) does not grow with each image, with LoRAs switching between
images and a new prompt every time. The RSS slope over 100 images is benchmarks/memory_flat.py's to print; this
test is the fast guard of the part a leak in the pack's own code would show in."""
from __future__ import annotations

import gc
import tracemalloc

from benchmarks.memory_flat import slope
from lora_files import LAYERS_A, LAYERS_B, write_lora


def test_the_python_heap_does_not_grow_per_image(tiny_pipe, tmp_path):
    loras = [[(write_lora(tmp_path / "a.safetensors", LAYERS_A, seed=1), 0.7)],
             [(write_lora(tmp_path / "b.safetensors", LAYERS_B, seed=2, style="peft"), 1.0)], []]

    def one(i):
        tiny_pipe.with_loras(loras[i % 3]).generate(prompt=f"a fox, variation {i}", seed=i, steps=1, width=64,
                                                    height=64, sampler="euler")

    for i in range(12):  # warm-up: the prompt cache fills (8), every LoRA list is prepared once
        one(i)
    tracemalloc.start()
    try:
        gc.collect()
        sizes = []
        for i in range(12, 30):
            one(i)
            gc.collect()
            sizes.append(tracemalloc.get_traced_memory()[0] / 1024)
    finally:
        tracemalloc.stop()
    assert slope(sizes) < 16, f"the Python heap grows {slope(sizes):.1f} KiB per image: {sizes}"


def test_prepared_loras_stay_bounded_when_one_lora_after_another_is_tried(tiny_pipe, tmp_path, monkeypatch):
    """A user trying LoRA after LoRA in one process: only the last MAX_PREPARED files stay prepared (each holds the
    file's factors), the active ones always; a list longer than the bound still activates whole, once."""
    from aura_flow.pipeline import loras as lora_state

    monkeypatch.setattr(lora_state, "MAX_PREPARED", 3)
    state = tiny_pipe._lora_state
    files = [write_lora(tmp_path / f"l{i}.safetensors", LAYERS_A, seed=i) for i in range(8)]
    try:
        tiny_pipe.set_loras([(files[0], 1.0)])  # active from now on
        for path in files[1:]:
            tiny_pipe.with_loras([(path, 0.5)])  # each checked and prepared, as a LoRA Loader node does
            assert len(state) <= 3 + 1, len(state)
        assert str(files[0].resolve()) in state._prepared  # the active one was never dropped
        assert str(files[-1].resolve()) in state._prepared  # the last one used is kept
        assert str(files[1].resolve()) not in state._prepared  # the oldest unused one is gone
        five = [(path, 0.2) for path in files[:5]]  # more than the bound in one list: all of it applied
        report = tiny_pipe.set_loras(five)
        assert len(report.loras) == 5 and len(state) == 5
        assert tiny_pipe.set_loras(five) is report  # nothing evicted from the active list: not applied again
        tiny_pipe.with_loras([(files[7], 1.0)])
        assert len(state) == 5 + 1 and tiny_pipe.set_loras(five) is report
    finally:
        tiny_pipe.set_loras([])


def test_file_hashes_stay_bounded(tmp_path, monkeypatch):
    from aura_flow import provenance

    monkeypatch.setattr(provenance, "MAX_CACHED", 4)
    monkeypatch.setattr(provenance, "_CACHE", {})
    hashes = []
    for i in range(10):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(bytes([i]) * 100)
        hashes.append(provenance.file_hash(path))
    assert len(provenance._CACHE) == 4 and len(set(hashes)) == 10
    assert provenance.file_hash(tmp_path / "f9.bin") == hashes[9]
