#!/usr/bin/env bash
# The offline Triton compile check (tests/triton_compile_check.py, sm_90) under Triton 3.6, the
# version the GPU machines have, next to the pinned one that the test suite uses: Triton 3.6's
# wheel goes into build/triton36 (no dependencies; it shadows the installed Triton only through
# PYTHONPATH for this one command). Fails on a compile error, a register spill or a missing
# 16-byte vector load. About 3 minutes on the 2-core CI machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
dest=build/triton36
if [[ ! -f $dest/triton/__init__.py ]]; then
    if ! "$PY" -m pip install -q --no-deps --target "$dest" "triton==3.6.0"; then
        # No wheel reachable (an offline mirror without it): say so loudly; the pinned Triton's
        # compile check still runs in the test suite (tests/test_custom_ops.py).
        echo "triton36_compile_check: SKIPPED: pip could not install triton==3.6.0 here" >&2
        rm -rf "$dest"
        exit 0
    fi
fi
env -u TRITON_INTERPRET PYTHONPATH="$PWD/$dest:$PWD" TRITON_CACHE_DIR="$PWD/build/triton36-cache" \
    "$PY" tests/triton_compile_check.py --archs 90 "$@"
