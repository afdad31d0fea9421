#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (its image has torch, triton, transformers, typer, rich, peft,
# onnx, onnxruntime but no diffusers or webdataset) into .whl/ (git-ignored), for `run(carry=[".whl"])`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl diffusers webdataset braceexpand
du -sh .whl
