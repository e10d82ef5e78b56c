#!/usr/bin/env bash
# Compile csrc/ with this machine's nvcc (compile only: no GPU needed).
#
# Builds the extension in place (openlora_kernels/ops/_cuda_sgmv*.so) through setup.py, the same
# route as `pip install` (CMake + Ninja when present, else nvcc directly), for sm_90 unless
# OPENLORA_CUDA_ARCHS says otherwise, from a clean build directory so every kernel is compiled.
# Fails when a kernel does not compile or spills registers (ptxas -v); prints the resource table.
# The CPU tests in tests/test_cuda_backend.py then import the module and check its archs.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python}

if ! "$PY" -c "import sys; sys.path.insert(0, 'openlora_kernels/ops'); import cuda_build as b; sys.exit(b.find_nvcc() is None)"; then
  echo "compile_cuda: nvcc not found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 1
fi
"$PY" -c "import pybind11" 2>/dev/null || "$PY" -m pip install -q "pybind11>=2.12"

tmp=build/cuda-ci
rm -rf "$tmp"
mkdir -p "$tmp"
log="$tmp/build.log"
if ! OPENLORA_CUDA_ARCHS="${OPENLORA_CUDA_ARCHS:-90}" OPENLORA_CUDA_REQUIRED=1 OPENLORA_PTXAS_VERBOSE=1 \
     "$PY" setup.py -q build_ext --inplace --build-temp "$tmp" >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "compile_cuda: FAILED (full log: $log)" >&2
  exit 1
fi
grep -E "^openlora_kernels: built" "$log" || true
"$PY" openlora_kernels/ops/cuda_build.py --ptxas-report "$log" | tee "$tmp/resources.md"
# The tensor-core expand reads the pool's column-contiguous B by 16-byte async copies and
# transposing shared-memory loads (LDGSTS.128 + LDSM.MT88), and pairs y's columns (STG.E):
# fail if a rebuild loses them (checked in the SASS of every mma_expand instantiation).
cuobj=$(command -v cuobjdump || true)
[[ -z $cuobj ]] && cuobj=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null || true)
if [[ -n $cuobj && -x $cuobj ]]; then
  so=$(ls openlora_kernels/ops/_cuda_sgmv*.so | head -1)
  "$cuobj" -sass "$so" > "$tmp/sass.txt"
  "$PY" - "$tmp/sass.txt" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
funcs = re.split(r"\n\s*Function : ", text)[1:]
bad, n = [], 0
for f in funcs:
    name = f.split("\n", 1)[0]
    if "mma_expand" not in name:
        continue
    n += 1
    for op in ("LDSM.16.MT88", "LDGSTS.E.BYPASS.128", "STG.E "):
        if op not in f:
            bad.append(f"{name}: no {op.strip()}")
if n == 0:
    bad.append("no mma_expand kernel in the SASS")
print(f"compile_cuda: SASS of {n} mma_expand kernels: " + ("ok" if not bad else "; ".join(bad)))
sys.exit(1 if bad else 0)
PYEOF
else
  echo "compile_cuda: cuobjdump not found; the SASS check of the expand is skipped" >&2
fi
echo "compile_cuda: ok in $(( $(date +%s) - start ))s"
