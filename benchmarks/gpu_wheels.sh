#!/usr/bin/env bash
# The wheels the GPU machine lacks for `python -m benchmarks.gpu_check` (see benchmarks/README.md, "GPU"), downloaded
# into .whl/ (ignored by git; the device call carries it). That machine has Python 3.12, torch 2.11, transformers
# 5.17, huggingface_hub 1.33, safetensors 0.8, numpy 2.x, scipy, pillow, sentencepiece, tokenizers, requests,
# filelock, regex, pyyaml, tqdm and pytest (/work/.library/device/KINDS.md) but not these four. Their own needs are
# all there (diffusers 0.42.1: huggingface-hub>=1.32, safetensors>=0.8, importlib_metadata only below Python 3.8;
# gguf: numpy, pyyaml, requests, tqdm; torchsde: numpy, scipy, torch, trampoline), so --no-deps fetches exactly
# this set, at the versions the team's venv runs. All four are pure Python (py3-none-any), about 6.3 MiB together.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 gguf==0.19.0 torchsde==0.2.6 trampoline==0.1.2
ls -l .whl
du -sh .whl
