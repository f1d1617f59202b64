#!/usr/bin/env bash
# The GPU tier in one call, on a machine with CUDA GPUs:
#   1. installs the carried wheels in .whl/ (pyzmq, msgspec) into $PDCHECK_SITE when they are
#      not importable already, and puts them and the repository on PYTHONPATH;
#   2. runs the tests marked gpu or multi_gpu in tests/ and suites/ (those needing vLLM, or more
#      GPUs than the machine has, skip with their reason);
#   3. runs the NCCL benchmark (python -m pdcheck.bench_nccl) when there are 2 GPUs.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0). Logs, gpu-junit.xml, bench.json and
# summary.txt go to $OUT when it is set, else to runs/gpu-tier. Exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
PY=${PYTHON:-python3}
out=${OUT:-runs/gpu-tier}
mkdir -p "$out" runs

install_wheels() {
    "$PY" -c "import zmq, msgspec" 2>/dev/null && return 0
    compgen -G ".whl/*.whl" >/dev/null || { echo "gpu_tier: pyzmq/msgspec missing and no .whl/ to install" >&2; return 1; }
    local site=${PDCHECK_SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

plugin_args() {  # the plugin's entry point exists only where pdcheck is installed
    "$PY" - <<'EOF'
import importlib.metadata as m
print("" if any(e.value == "pdcheck.plugin" for e in m.entry_points(group="pytest11")) else "-p pdcheck.plugin")
EOF
}

junit_counts() {
    "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print(f"no junit report ({e})"); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, {n['failures']} failed, "
      f"{n['errors']} errors, {n['skipped']} skipped")
EOF
}

install_wheels || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
"$PY" -c "import torch; from pdcheck.connector.nccl_lib import find_library as f; print('torch', torch.__version__, \
'| GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], '| NCCL:', f())" \
    2>&1 | tee "$out/env.txt"

# shellcheck disable=SC2046
timeout -k 10 "${PDCHECK_TEST_TIMEOUT:-420}" "$PY" -m pytest -p no:cacheprovider $(plugin_args) -o timeout=300 \
    -m "gpu or multi_gpu" -rs --basetemp=runs/pytest-gpu --junitxml="$out/gpu-junit.xml" tests suites \
    2>&1 | tee "$out/pytest.log"
tests_rc=${PIPESTATUS[0]}

bench_rc=0
if [ "$gpus" -ge 2 ]; then
    timeout -k 10 "${PDCHECK_BENCH_TIMEOUT:-240}" "$PY" -m pdcheck.bench_nccl --json "$out/bench.json" 2>&1 \
        | tee "$out/bench.log"
    bench_rc=${PIPESTATUS[0]}
else
    echo "gpu_tier: bench skipped: needs 2 CUDA GPUs, found $gpus" | tee "$out/bench.log"
fi

{
    echo "GPU tier on $gpus GPU(s)"
    echo "tests: exit $tests_rc: $(junit_counts "$out/gpu-junit.xml")"
    echo "bench: exit $bench_rc"
    grep -A10 "^NCCL plane" "$out/bench.log" || true
} | tee "$out/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
