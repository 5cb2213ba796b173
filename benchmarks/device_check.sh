#!/usr/bin/env bash
# The checks that need a GPU, as one command for a machine with CUDA: the CUDA path against the CPU
# path (tests/test_accelerator.py), the featurizer benchmarks (float32 and bfloat16) and attributing
# vs generating, on the device. Logs and result JSONs go to $OUT (or benchmarks/results/device/).
#
# The device tool's nvidia-h200 image has torch, transformers, peft, safetensors and pytest but not
# diffusers; it travels as wheels. Once, here, in the repo's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
# then run it there with `carry: [".whl"]`:
#   bash benchmarks/device_check.sh
# DEVICE=cpu QUICK=1 bash benchmarks/device_check.sh dry-runs the plumbing on a CPU (demo config only).
set -uo pipefail
device=${DEVICE:-cuda}
out=${OUT:-benchmarks/results/device}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DAS_SD_HOME=${DAS_SD_HOME:-/tmp/das-sd-home}
export DAS_SD_TEST_ACCELERATOR=$device HF_HUB_OFFLINE=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
if [ -n "${QUICK:-}" ]; then configs=(--configs demo); else configs=(--configs demo,sd-proportions --ranks 4,16,64); fi
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_accelerator.py 2>&1 | tee "$out/test_accelerator.log" || status=1
python3 benchmarks/featurize.py --device "$device" "${configs[@]}" --out "featurize-$device" 2>&1 \
    | grep -v -i warn | tee "$out/featurize.log" || status=1
python3 benchmarks/featurize.py --device "$device" "${configs[@]}" --autocast bf16 \
    --methods train,das-sd,reference --out "featurize-$device-bf16" 2>&1 | grep -v -i warn | tee "$out/featurize-bf16.log" || status=1
python3 benchmarks/query.py --device "$device" --out "query-$device" 2>&1 | grep -v -i warn | tee "$out/query.log" || status=1
cp benchmarks/results/featurize-"$device"*.json benchmarks/results/query-"$device".json "$out"/ 2>/dev/null
exit $status
