#!/usr/bin/env bash
# The GPU check: one command, at most ~6 minutes on one GPU. It installs what the GPU image lacks (from .whl/),
# runs the CUDA tests (tests/test_cuda.py, `pytest -m cuda`) and prints a samples/s table of both families on
# CPU and GPU (benchmarks/sampling_speed.py, the sampler's default path, exact log q included). Quote the table.
#
# Prepare on the CPU machine, once (about 60 MB in .whl/, which git ignores):
#     bash benchmarks/device_check.sh --prepare
# Then through the device tool, from the repository root, carrying .whl:
#     run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=480)
# Outputs also land in $OUT (device_check.log, sampling_speed_{cpu,cuda}.txt) when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    bash ../shared/tools/gpu-wheels.sh --with-openmmtools
    # pytest and its pure-Python needs, which the GPU image may lack.
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl pytest pluggy iniconfig packaging
    du -sh .whl
    exit 0
fi

out="${OUT:-/tmp/device_check}"
mkdir -p "$out"
log="$out/device_check.log"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$PWD/.site" .whl/*.whl >>"$log" 2>&1 \
        || echo "device_check: installing .whl/ failed (see $log)"
    export PYTHONPATH="$PWD/.site:$PWD"
else
    echo "device_check: no .whl/ here; run 'bash benchmarks/device_check.sh --prepare' on the CPU machine and carry .whl"
    export PYTHONPATH="$PWD"
fi
python3 - <<'EOF' 2>&1 | tee -a "$log"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

status=0
echo "== CUDA tests (pytest -m cuda)" | tee -a "$log"
timeout 200 python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# Samples/s of both families on the sampler's default path: CNF (shipped 5x64, gl-16 at 1e-5) and the
# internal-coordinate flow (shipped model); AA (23 atoms) and NY (38). The GPU rows draw larger batches.
common=(--peptides AA NY --sizes 5x64 --methods default --no-reference --ic-model openmm_tbg/models/ic_dipeptides.pt)
echo "== sampling speed, CPU (1 thread)" | tee -a "$log"
timeout 150 python3 benchmarks/sampling_speed.py "${common[@]}" --device cpu --threads 1 --samples 2 \
    --ic-samples 512 2>&1 | tee "$out/sampling_speed_cpu.txt" | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== sampling speed, GPU" | tee -a "$log"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "device_check: no CUDA device" | tee -a "$log"; exit 1; }
timeout 120 python3 benchmarks/sampling_speed.py "${common[@]}" --device cuda --threads 1 --samples 16 \
    --ic-samples 8192 2>&1 | tee "$out/sampling_speed_cuda.txt" | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "device_check: exit status $status (0: every step passed)" | tee -a "$log"
exit $status
