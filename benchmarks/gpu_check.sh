#!/usr/bin/env bash
# `make gpu-check`: the GPU-marked tests, then the CUDA training-step benchmarks (memory, speed), on one GPU within
# about 10 minutes.
#
#   bash benchmarks/gpu_check.sh                  a CUDA machine with the project installed (.venv), or
#                                                 a bare one with python3 + torch/lightning/transformers (see below)
#   bash benchmarks/gpu_check.sh --dry-run        the same steps on CPU, small: checks this script before a GPU run
#   bash benchmarks/gpu_check.sh --fetch-wheels   (here, with network) wheels of what a bare image lacks -> .whl/
#
# A bare machine without network (the lent H100/H200: python3 holds torch, lightning, transformers, pytest) runs the
# repository from its folder with PYTHONPATH=. and installs the wheels carried in .whl/ (rouge-score, nltk, datasets
# and their missing dependencies) into a private folder first. Output goes to stdout and, when $OUT is set, to
# $OUT/gpu_check.log with the benchmark's JSON beside it.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 nltk==3.10.4 defusedxml==0.7.1)
TESTS_LIMIT_S=200  # the GPU tests; the two benchmarks share the rest of about 9 minutes
BENCH_LIMIT_S=200
SPEED_LIMIT_S=150

fetch_wheels() {
    local pip=(python3 -m pip)
    [[ -x .venv/bin/pip ]] && pip=(.venv/bin/pip)
    mkdir -p .whl
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${WHEELS[@]}"
    "${pip[@]}" wheel -q --no-deps -w .whl rouge-score==0.1.2  # published as a source archive only
    ls .whl
}

pick_python() {
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, distillens" 2>/dev/null; then
        PY=.venv/bin/python
        return
    fi
    PY=python3
    export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
    if [[ -d .whl ]] && ! python3 -c "import rouge_score, datasets" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/distillens-site .whl/*.whl || return 1
        export PYTHONPATH="$PYTHONPATH:/tmp/distillens-site"
    fi
}

report_environment() {
    echo "== gpu-check $(date -u +%FT%TZ) on $(hostname)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import sys, torch, lightning, transformers
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| lightning', lightning.__version__, '| transformers', transformers.__version__)
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
}

run_checks() {
    local dry_run=$1 out=${OUT:-logs/bench} status=0
    if [[ $dry_run == 1 ]]; then
        echo "== dry run on CPU: the GPU tests skip, the benchmark runs its CPU workload briefly"
        bench=(--device cpu --tokens 32 --warmup 0 --steps 1 --batches 3)
        speed=(--workload tiny --device cpu --rounds 1)
    else
        "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || return 1
        bench=(--device cuda --warmup 2 --steps 5 --batches 8 16 32 --timeout 120)
        speed=(--workload gpt2 --device cuda --warmup 2 --rounds 3)  # 4 objectives x 2 precisions
    fi
    echo "== GPU tests (pytest -m gpu), at most ${TESTS_LIMIT_S} s"
    timeout "$TESTS_LIMIT_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || status=1
    echo "== training-step benchmark, at most ${BENCH_LIMIT_S} s"
    timeout "$BENCH_LIMIT_S" "$PY" benchmarks/train_step.py "${bench[@]}" --out "$out" || status=1
    echo "== training-step speed (KD only, DistillLens exact, m=1 and eager kernels; fp32 and bf16), at most ${SPEED_LIMIT_S} s"
    timeout "$SPEED_LIMIT_S" "$PY" benchmarks/train_speed.py "${speed[@]}" --out "$out" || status=1
    echo "== gpu-check finished with status $status after ${SECONDS} s"
    return $status
}

main() {
    case "${1:-}" in
        --fetch-wheels) fetch_wheels; return ;;
        --dry-run) dry_run=1 ;;
        "") dry_run=0 ;;
        *) echo "gpu_check.sh: unknown option ${1} (use --dry-run or --fetch-wheels)" >&2; return 2 ;;
    esac
    export PYTHONUNBUFFERED=1
    pick_python || { echo "gpu_check.sh: could not install the wheels in .whl/" >&2; return 1; }
    report_environment
    run_checks "$dry_run"
}

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    main "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
main "$@"
