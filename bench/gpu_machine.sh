#!/usr/bin/env bash
# Everything faithlens measures on the GPU machine, in one call (docs/gpu.md): the CUDA test path, then
# bench/gpu.py, then the engine's schedule under load and the GRPO step against TRL on CUDA. Run from the
# repository root with `.whl` and `.gpu` carried (`make gpu-bundle` makes both); results land in $OUT.
#
#   bash bench/gpu_machine.sh            # at most ≈ 9.5 minutes (timeouts 100+280+60+120 s, plus installs):
#                                        # give the device call timeout_s 590
#   bash bench/gpu_machine.sh bench      # bench/gpu.py only
set -uo pipefail
OUT=${OUT:-/tmp/faithlens-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FAITHLENS_DATA_DIR=${FAITHLENS_DATA_DIR:-$PWD/.gpu/data}  # GSM8K does not travel; no test below needs it
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
# Fail at once, not minutes in, if a carried wheel does not import over the image's packages.
python3 -c "import torch, transformers, pydantic, pydantic_settings, peft, trl, faithlens.atman, tests.devices; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1

if [ "${1:-all}" = all ]; then
  # The model-level tests on CUDA (tests/devices.py); SmolLM2's GGUF does not travel, so its tests stay here.
  FAITHLENS_TEST_DEVICE=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider -m "not smollm" -rf \
    tests/test_metrics_reference.py tests/test_atman.py tests/test_decode_path.py tests/test_training.py \
    tests/test_study.py tests/test_static_decode.py -k "not compiles and not sized_cache" 2>&1 | tee "$OUT/cuda-tests.log" | tail -15
fi

timeout 280 python3 bench/gpu.py "$OUT" 2>&1 | tee "$OUT/gpu.log" | grep -v Warning

if [ "${1:-all}" = all ]; then
  # The benchmarks that load a model by path get a saved random one: the engine's schedule (4 streams
  # beside an exact-AtMan analysis) on the 135M shape, and one GRPO step against TRL's on the 3B shape
  # (16 rollouts × 128 tokens, LoRA r 16, toy questions: GSM8K does not travel).
  python3 bench/gpu.py --save-model smollm2-135m /tmp/m135 --device cuda \
    && timeout 45 python3 bench/serve.py --part engine --model /tmp/m135 --device cuda 2>&1 \
    | tee "$OUT/serve-engine.log" | tail -12
  python3 bench/gpu.py --save-model llama-3.2-3b /tmp/m3b --device cuda \
    && timeout 100 python3 bench/grpo.py --model /tmp/m3b --device cuda --prompts 4 --generations 4 \
      --max-new-tokens 128 --lora-r 16 --steps 1 --toy-problems 2>&1 | tee "$OUT/grpo.log" | tail -20
fi
