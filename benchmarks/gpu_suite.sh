#!/usr/bin/env bash
# The whole GPU session in ONE command (one device call, under 10 minutes), run from the repo root:
#
#     bash benchmarks/gpu_suite.sh
#
# Steps, in order; each has a time limit, a failing or timed-out step never stops the next. The
# questions first (GPU tests and parity: about 3 minutes), then the benchmarks:
#   env         nvidia-smi, versions of python / torch / triton / nvcc / compute-sanitizer
#   install     pip install -e . --no-deps --no-build-isolation, CUDA kernels for sm_90 only
#               (OPENLORA_CUDA_ARCHS, default 90; PYTHONPATH=repo root either way)
#   backends    olk.available_backends() on the GPU
#   pytest_gpu  pytest -m gpu -q (the GPU-only tests; exit 5 = none collected)
#   ops_parity  pytest tests/test_ops_parity.py and test_triton_segment.py on the GPU (bf16
#               tensor-core parity included, both Triton decode plans)
#   parity      benchmarks/sanitizer_parity.py --quick: every op / backend on awkward indices
#               (also fills Triton's cache for the next step)
#   sanitizer   the same under compute-sanitizer memcheck, caching allocator off
#   bench       benchmarks/bench_kernels.py at full size (55% of the time left), then
#               bench_model.py (2/3 of what remains) and bench_swap.py (the rest), each under
#               --budget-s and a hard limit of its share
#   plots       benchmarks/plot.py for each results CSV (when matplotlib is there)
#   report      benchmarks/report.py: markdown tables + the issues' targets, per results CSV
#               (kernels, model, swap)
#   parity_full the parity run over every dtype and block_m, if time is left
#   tests       the rest of the test suite (pytest -m "not gpu") if time is left
# and always, last: results + logs + plots tarred into $OUT, a summary table printed at the end.
#
# Files in $OUT (the device tool returns at most 8; this script writes at most 8): suite.log
# (everything printed), summary.txt, gpu_suite_results.tar.gz (results/*.csv, plots/*.png,
# logs/*, reports), report_<csv>.md (up to 3) and the results CSVs themselves (up to 2; all of
# them are in the tarball). To bring them home:
#     mkdir -p /tmp/gs && tar -xzf <files_at>/gpu_suite_results.tar.gz -C /tmp/gs
#     cp /tmp/gs/results/*.csv benchmarks/results/     # then commit them with the plots you keep
#
# Knobs (environment): OUT (default ./gpu_suite_out), PYTHON (python3), OPENLORA_COMMIT (the commit
# the rows name when the tree has no .git, as on the device machine: pass it!), SUITE_RESULTS_DIR
# (where the benchmarks write, default $OPENLORA_BENCH_OUT or benchmarks/out: untracked; a run cut
# short by its time limit leaves the old file there and its rows in <file>.partial, which is packed
# too), SUITE_DEADLINE_S (470: the
# whole script ends by then), SUITE_STEPS (comma list of the steps above; default all),
# INSTALL_TIMEOUT_S (150), PYTEST_GPU_TIMEOUT_S (90), OPS_PARITY_TIMEOUT_S (60), PARITY_TIMEOUT_S (45),
# SANITIZER_TIMEOUT_S (60), BENCH_MIN_S (150: earlier steps are cut short to leave the
# benchmarks this much), BENCH_ARGS (extra arguments for bench_kernels.py), SUITE_BENCHES
# (benchmarks after bench_kernels, default "bench_model bench_swap"), KERNELS_PCT (55), MODEL_PCT
# (67: bench_model's part of the time after bench_kernels), SUITE_QUICK=1
# (benchmarks and parity in --quick mode: a dry run of this script, also on a CPU machine).

set -u -o pipefail   # deliberately not -e: every step runs whatever happened before

START=$(date +%s)
DEADLINE=$((START + ${SUITE_DEADLINE_S:-470}))
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_suite_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/results" "$WORK/plots"
SUMMARY=$WORK/summary.tsv
: > "$SUMMARY"
STEPS=",${SUITE_STEPS:-env,install,backends,pytest_gpu,ops_parity,parity,sanitizer,bench,plots,report,parity_full,tests},"
QUICK=${SUITE_QUICK:-0}
POST_RESERVE=45      # seconds kept for plots, report and packaging
KERNELS_PCT=${KERNELS_PCT:-55}   # share of the benchmark time for bench_kernels (the rest: model, swap)
PACK_RESERVE=15      # seconds kept for packaging alone
BENCH_MIN_S=${BENCH_MIN_S:-150}
RESULTS=${SUITE_RESULTS_DIR:-${OPENLORA_BENCH_OUT:-$ROOT/benchmarks/out}}
mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Rows name the commit they measured; a copy of the tree without .git must be told (OPENLORA_COMMIT).
if COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT+dirty"
    export OPENLORA_COMMIT=${OPENLORA_COMMIT:-$COMMIT}
fi
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/suite.log") 2>&1
TEE_PID=$!

now() { date +%s; }
left() { echo $((DEADLINE - $(now))); }
wants() { [[ $STEPS == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$SUMMARY"; }

# step NAME CAP_S RESERVE_S CMD... : run CMD with a limit of min(CAP_S, time left - RESERVE_S),
# log to $LOGS/NAME.log, show its tail, and record status / exit code / seconds.
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local limit=$(( $(left) - reserve ))
    (( cap < limit )) && limit=$cap
    if (( limit < 5 )); then
        echo "=== [$name] skipped: no time left"
        record "$name" "skipped" "-" 0 "no time left"
        return 0
    fi
    echo "=== [$name] limit ${limit}s: $*"
    local t0 rc status
    t0=$(now)
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 25 "$LOGS/$name.log"
    case $rc in
        0) status=ok ;;
        124|137) status=TIMEOUT ;;
        *) status=FAILED ;;
    esac
    [[ $name == pytest_gpu || $name == tests ]] && [[ $rc == 5 ]] && status="none collected"
    record "$name" "$status" "$rc" $(( $(now) - t0 )) "${NOTE:-}"
    NOTE=""
    return $rc
}

CSVS=()
collect_csvs() {  # the results CSVs this run wrote (mtime after START)
    CSVS=()
    local f g dup
    for f in "$RESULTS"/*.csv "$ROOT"/benchmarks/results/*.csv; do
        [[ -f $f && $(stat -c %Y "$f") -ge $START ]] || continue
        dup=0
        for g in "${CSVS[@]}"; do [[ $(realpath "$g") == $(realpath "$f") ]] && dup=1; done
        (( dup )) || CSVS+=("$f")
    done
}

package() {
    [[ -n ${PACKAGED:-} ]] && return 0
    PACKAGED=1
    local f
    collect_csvs
    for f in "${CSVS[@]}"; do cp "$f" "$WORK/results/"; done
    for f in "$RESULTS"/*.partial; do    # rows of a benchmark stopped by its limit (the old file is kept)
        [[ -f $f && $(stat -c %Y "$f") -ge $START ]] && cp "$f" "$WORK/results/"
    done
    local n=0
    for f in "$WORK"/report_*.md; do [[ -f $f ]] && cp "$f" "$OUT/"; done
    for f in "$WORK"/results/*.csv; do
        [[ -f $f ]] || continue
        (( n < 2 )) && cp "$f" "$OUT/" && n=$((n + 1))
    done
    {
        printf '%-28s %-15s %4s %6s  %s\n' step status rc sec note
        while IFS=$'\t' read -r name status rc sec note; do
            printf '%-28s %-15s %4s %6s  %s\n' "$name" "$status" "$rc" "$sec" "$note"
        done < "$SUMMARY"
        echo "total $(( $(now) - START )) s; files in \$OUT: $(cd "$OUT" && ls | grep -v '^summary.txt$' | tr '\n' ' ')summary.txt gpu_suite_results.tar.gz"
    } > "$WORK/summary.txt"
    cp "$WORK/summary.txt" "$OUT/summary.txt"
    tar -czf "$OUT/gpu_suite_results.tar.gz" -C "$WORK" results plots logs summary.txt \
        $(cd "$WORK" && ls report_*.md 2>/dev/null) 2>/dev/null
    echo
    echo "================================ gpu_suite summary ================================"
    [[ -f $WORK/targets.txt ]] && cat "$WORK/targets.txt"
    cat "$OUT/summary.txt"
}
trap 'echo "interrupted"; package; exit 130' INT TERM

echo "gpu_suite: repo $ROOT, commit ${OPENLORA_COMMIT:-unknown (set OPENLORA_COMMIT)}, OUT=$OUT, deadline ${SUITE_DEADLINE_S:-470}s, quick=$QUICK"

# ------------------------------------------------------------------------------------ env
if wants env; then
    cat > "$WORK/env.sh" <<ENV
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    || echo "nvidia-smi: not available"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
"$PY" -c "import matplotlib; print('matplotlib', matplotlib.__version__)" || echo "matplotlib: not importable"
nvcc --version | tail -n 2 || echo "nvcc: not available"
compute-sanitizer --version | head -n 2 || echo "compute-sanitizer: not available"
git log --oneline -n 3 || true
ENV
    step env 30 0 bash "$WORK/env.sh"
fi

# -------------------------------------------------------------------------------- install
if wants install; then
    export OPENLORA_CUDA_ARCHS=${OPENLORA_CUDA_ARCHS:-90}      # sm_90: one arch, a third of the compile
    step install "${INSTALL_TIMEOUT_S:-150}" $((BENCH_MIN_S + POST_RESERVE)) \
        "$PY" -m pip install -e . --no-deps --no-build-isolation \
        || echo "install failed: carrying on with PYTHONPATH=$ROOT"
fi
if wants backends; then
    step backends 60 $((BENCH_MIN_S + POST_RESERVE)) "$PY" -c "
import torch, openlora_kernels as olk
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
for info in olk.available_backends(dev).values():
    print(info)"
fi

# ---------------------------------------------------------------------------------- tests
if wants pytest_gpu; then
    step pytest_gpu "${PYTEST_GPU_TIMEOUT_S:-90}" $((BENCH_MIN_S + POST_RESERVE)) \
        "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs --junitxml="$LOGS/pytest_gpu.xml"
fi
if wants ops_parity; then  # the parity matrix on the GPU: bf16 tensor-core paths included
    step ops_parity "${OPS_PARITY_TIMEOUT_S:-60}" $((BENCH_MIN_S + POST_RESERVE)) \
        "$PY" -m pytest -q -p no:cacheprovider -rfE -x tests/test_ops_parity.py tests/test_triton_segment.py
fi
if wants parity; then  # the --quick subset: also compiles what the sanitizer run needs
    step parity "${PARITY_TIMEOUT_S:-45}" $((BENCH_MIN_S + POST_RESERVE)) \
        "$PY" -m benchmarks.sanitizer_parity --quick
fi
if wants sanitizer; then
    if command -v compute-sanitizer > /dev/null 2>&1 && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 step sanitizer "${SANITIZER_TIMEOUT_S:-60}" $((BENCH_MIN_S + POST_RESERVE)) \
            compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 30 \
            "$PY" -m benchmarks.sanitizer_parity --quick
        grep -E "ERROR SUMMARY|Invalid|out of bounds" "$LOGS/sanitizer.log" | head -n 10
    else
        echo "=== [sanitizer] skipped: compute-sanitizer or a CUDA device is missing"
        record sanitizer "skipped" "-" 0 "compute-sanitizer or GPU missing"
    fi
fi

# ----------------------------------------------------------------------------- benchmarks
if wants bench; then
    # bench_kernels first with the largest share (its headline cases come first inside it), then
    # the model and swap benchmarks ($SUITE_BENCHES), each with a bounded share of what is left:
    # every script gets --budget-s (starts no new case past it) and a hard limit of its share.
    # (bench_hf_cpu_decode.py is a CPU benchmark: not part of a GPU session.)
    read -r -a OTHERS <<< "${SUITE_BENCHES:-bench_model bench_swap}"
    avail=$(( $(left) - POST_RESERVE ))
    share=$avail
    (( ${#OTHERS[@]} > 0 )) && share=$((avail * KERNELS_PCT / 100))
    budget=$((share - 40))                                   # room for the last case and start-up
    (( budget < 20 )) && budget=20
    BENCH_FLAGS=(--out-dir "$RESULTS" --budget-s "$budget")
    [[ $QUICK == 1 ]] && BENCH_FLAGS=(--out-dir "$RESULTS" --quick)
    # shellcheck disable=SC2086
    NOTE="budget ${budget}s" step bench_kernels "$share" "$POST_RESERVE" \
        "$PY" -m benchmarks.bench_kernels "${BENCH_FLAGS[@]}" ${BENCH_ARGS:-}
    n_left=${#OTHERS[@]}
    for name in "${OTHERS[@]}"; do
        avail=$(( $(left) - POST_RESERVE ))
        case $name in                       # share of what is left: model 2/3 of it, swap the rest
            bench_model) pct=${MODEL_PCT:-67} ;;
            *) pct=100 ;;
        esac
        (( n_left == 1 )) && pct=100
        share=$((avail * pct / 100))
        n_left=$((n_left - 1))
        flags=(--out-dir "$RESULTS")
        if [[ $QUICK == 1 ]]; then
            flags+=(--quick)
        else
            budget=$((share - 30))                       # the last case, the memory rows, exit
            (( budget < 15 )) && budget=15
            flags+=(--budget-s "$budget")
        fi
        NOTE="share ${share}s" step "$name" "$share" "$POST_RESERVE" "$PY" -m "benchmarks.$name" "${flags[@]}"
    done
fi

# ------------------------------------------------------------------------- plots, report
collect_csvs
if wants plots; then
    for f in "${CSVS[@]}"; do
        stem=$(basename "$f" .csv)
        step "plot_$stem" 60 "$PACK_RESERVE" "$PY" -m benchmarks.plot "$f" --out-dir "$WORK/plots/$stem"
    done
fi
if wants report; then
    for f in "${CSVS[@]}"; do
        stem=$(basename "$f" .csv)
        [[ $stem == kernels_* || $stem == model_* || $stem == swap_* ]] || continue
        step "report_$stem" 60 "$PACK_RESERVE" "$PY" -m benchmarks.report "$f" --out "$WORK/report_$stem.md"
        if [[ -f $WORK/report_$stem.md ]] && grep -q '^#### Targets' "$WORK/report_$stem.md"; then
            { echo "targets ($stem):"; sed -n '/^#### Targets/,$p' "$WORK/report_$stem.md" | tail -n +3; } >> "$WORK/targets.txt"
        fi
    done
fi

# ------------------------------------------------------------- full parity, the rest of the tests
if wants parity_full && [[ $QUICK != 1 ]]; then  # every dtype and block_m: many Triton compiles
    step parity_full 150 $((PACK_RESERVE + 60)) "$PY" -m benchmarks.sanitizer_parity
fi
if wants tests; then
    if (( $(left) - PACK_RESERVE > 60 )); then
        step tests 100000 "$PACK_RESERVE" "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" -rfE
    else
        echo "=== [tests] skipped: less than a minute left"
        record tests "skipped" "-" 0 "no time left"
    fi
fi

package
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null   # let tee finish writing suite.log before the command returns
exit 0
