#!/usr/bin/env bash
# Run tests/gpu on a bare CUDA machine that has torch, lightning, transformers, peft and pytest but not this
# project's other requirements; tests/gpu/prepare_device.sh builds what it carries (.whl/, .shared/).
# The log is written to $OUT/gpu_tests.log (or ./gpu_tests.log).
set -o pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
mkdir -p ../shared && cp -r .shared/data ../shared/  # paths.data_dir is ../shared/data beside the repo
mkdir -p /tmp/su_cache && cp -r .shared/cache/tokenizers /tmp/su_cache/  # the tokenizer model=tiny uses
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SAFETY_UNITS_CACHE=/tmp/su_cache WANDB_MODE=offline
nvidia-smi -L
python3 -c "import torch, lightning, transformers, peft, deepspeed; print('torch', torch.__version__, 'lightning',
lightning.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed',
deepspeed.__version__)"
python3 -m pytest -m gpu tests/gpu -s -q -p no:cacheprovider --durations=0 "$@" 2>&1 | tee "${OUT:-.}/gpu_tests.log"
