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
