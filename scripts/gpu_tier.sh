#!/usr/bin/env bash
# The GPU tier in one call, on a machine with CUDA GPUs:
#     bash scripts/gpu_tier.sh [tests] [bench] [sanitizer]     (no step named: all three)
#   1. installs the carried wheels in .whl/ (pyzmq, msgspec) into $PDCHECK_SITE when they are
#      not importable already, and puts them and the repository on PYTHONPATH;
#   2. tests: runs the tests marked gpu or multi_gpu in tests/ and suites/ (those needing vLLM, or
#      more GPUs than the machine has, skip with their reason). The NCCL tests put their ranks on
#      GPUs of their own where there are enough, else on shared GPUs over NCCL's socket transport
#      (pdcheck.testing.gpu.place), so on a machine of one GPU they run too;
#   3. bench: runs the NCCL benchmark (python -m pdcheck.bench.nccl $PDCHECK_BENCH_ARGS; on one GPU
#      by default with fewer requests, as it then times loopback sockets, not NVLink);
#   4. sanitizer: with PDCHECK_SANITIZER=memcheck,racecheck,synccheck (any of them), reruns reference-connector
#      tests ($PDCHECK_SANITIZER_TESTS, by default one short race and the worker halves' GET path in
#      vLLM's layouts; never the mutants) under
#      `compute-sanitizer --tool T --target-processes all --error-exitcode 1`, the tools side by
#      side, each within $PDCHECK_SANITIZER_TIMEOUT s. Host API error codes are not reported
#      (NCCL and torch probe the driver), and racecheck and synccheck skip the kernels named by
#      $PDCHECK_SANITIZER_EXCLUDE (default kns=ncclDevKernel: NCCL 2.28.9's own SendRecv kernel
#      reports shared-memory hazards, and on its socket transport divergent barriers, in NCCL code,
#      not ours; memcheck checks it; set it empty to check them too). Any
#      other report, a missing summary or a test that does not pass fails the tier. Report counts
#      go to the summary, the logs to sanitizer.log.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0). Logs, gpu-junit.xml, bench.json and
# summary.txt (and sanitizer.log) of the steps run go to $OUT when it is set, else to
# runs/gpu-tier. Exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
PY=${PYTHON:-python3}
out=${OUT:-runs/gpu-tier}
reference_race=tests/test_stream_races.py::test_reference_connector_verifies_every_transfer_under_stream_races
plugin_path=tests/test_nccl_plane.py::test_requests_arrive_bitwise_exact_in_vllm_and_native_layouts_and_the_log_shows_each_transfer
SANITIZER_TESTS=${PDCHECK_SANITIZER_TESTS:-"$reference_race[compute_stall] $plugin_path[get-vllm]"}
NCCL_EXCLUDE=${PDCHECK_SANITIZER_EXCLUDE-${PDCHECK_RACECHECK_EXCLUDE-kns=ncclDevKernel}}
mkdir -p "$out" runs
steps=" ${*:-tests bench sanitizer} "
for step in $steps; do
    case $step in tests | bench | sanitizer) ;; *) echo "gpu_tier: unknown step $step (tests, bench, sanitizer)" >&2; exit 2 ;; esac
done
runs() { [[ $steps == *" $1 "* ]]; }

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

race_lines() {  # what tests/test_stream_races.py recorded: requests verified, mutants caught
    "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    sys.exit()
for prop in root.iter("property"):
    if prop.get("name") in ("verified", "caught"):
        print(f"stream races: {prop.get('name')}: {prop.get('value')}")
EOF
}

find_sanitizer() {
    command -v compute-sanitizer && return 0
    local found
    for found in /usr/local/cuda*/bin/compute-sanitizer; do
        [ -x "$found" ] && { echo "$found"; return 0; }
    done
    return 1
}

exclusion() {  # $1: tool; the sanitizer's option that skips kernels, where this tool skips some
    [[ $1 == racecheck || $1 == synccheck ]] && [ -n "$NCCL_EXCLUDE" ] || return 0
    local help
    help=$("$sanitizer" --help 2>&1)  # not piped into grep -q: under pipefail its early exit fails the test
    if [[ $help == *--kernel-name-exclude* ]]; then
        echo "--kernel-name-exclude $NCCL_EXCLUDE"
    else
        echo "--exclude $NCCL_EXCLUDE"
    fi
}

sanitize() {  # $1: tool; the reference tests under it, logged to runs/sanitizer-$1.log
    set -f  # test ids hold brackets; this runs in its own subshell
    # shellcheck disable=SC2046,SC2086
    timeout -k 10 "${PDCHECK_SANITIZER_TIMEOUT:-240}" "$sanitizer" --tool "$1" --target-processes all \
        --error-exitcode 1 --report-api-errors no $(exclusion "$1") "$PY" -m pytest -p no:cacheprovider $(plugin_args) \
        -o timeout=0 -q -rs --basetemp="runs/pytest-$1" $SANITIZER_TESTS >"runs/sanitizer-$1.log" 2>&1
}

sanitizer_line() {  # $1: tool, $2: its exit code, $3: its exclusion; prints its line, fails on any report
    local log="runs/sanitizer-$1.log" reports hazards summaries result
    reports=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$log" | awk '{s += $3} END {print s + 0}')
    hazards=$(grep -oE 'RACECHECK SUMMARY: [0-9]+' "$log" | awk '{s += $3} END {print s + 0}')
    summaries=$(grep -cE '(ERROR|RACECHECK) SUMMARY' "$log")
    result=$(grep -E '[0-9]+ (passed|failed|skipped|errors?).* in [0-9.]+s' "$log" | grep -v SUMMARY | tail -1)
    echo "sanitizer $1: $reports report(s), $hazards racecheck hazard(s), $summaries process summaries," \
        "exit $2, pytest: ${result:-no result}${3:+, kernels skipped: $3}"
    [ "$2" -eq 0 ] && [ "$reports" -eq 0 ] && [ "$hazards" -eq 0 ] && [ "$summaries" -gt 0 ] \
        && [[ $result == *passed* && $result != *failed* && $result != *error* && $result != *skipped* ]]
}

sanitizer_step() {  # the tools of $PDCHECK_SANITIZER side by side; their lines to runs/sanitizer.txt
    local tool pids=() rc=0 entry status
    : >runs/sanitizer.txt
    : >"$out/sanitizer.log"
    for tool in ${PDCHECK_SANITIZER//,/ }; do
        case $tool in
            memcheck | racecheck | synccheck | initcheck) sanitize "$tool" & pids+=("$!:$tool") ;;
            *) echo "sanitizer $tool: unknown tool" >>runs/sanitizer.txt; rc=1 ;;
        esac
    done
    for entry in "${pids[@]}"; do
        wait "${entry%%:*}"
        status=$?
        sanitizer_line "${entry#*:}" "$status" "$(exclusion "${entry#*:}")" >>runs/sanitizer.txt || rc=1
        { echo "=== ${entry#*:}"; head -c 4000000 "runs/sanitizer-${entry#*:}.log"; } >>"$out/sanitizer.log"
    done
    return $rc
}

install_wheels || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
"$PY" -c "import torch; from pdcheck.connector.nccl_lib import find_library as f; print('torch', torch.__version__, \
'| GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], '| NCCL:', f())" \
    2>&1 | tee "$out/env.txt"
pairing=$("$PY" -c "from pdcheck.testing.gpu import pairing; print(pairing())" 2>&1)

tests_rc=0
if runs tests; then
    # shellcheck disable=SC2046
    timeout -k 10 "${PDCHECK_TEST_TIMEOUT:-540}" "$PY" -m pytest -p no:cacheprovider $(plugin_args) -o timeout=300 \
        -m "gpu or multi_gpu" -rs --basetemp=runs/pytest-gpu --junitxml="$out/gpu-junit.xml" tests suites \
        2>&1 | tee "$out/pytest.log"
    tests_rc=${PIPESTATUS[0]}
fi

bench_rc=0
if ! runs bench; then
    :
elif [ "$gpus" -ge 1 ]; then
    [ "$gpus" -ge 2 ] && default_bench_args="" || default_bench_args="--warmup 2 --repeat 5"
    # shellcheck disable=SC2086
    timeout -k 10 "${PDCHECK_BENCH_TIMEOUT:-300}" "$PY" -m pdcheck.bench.nccl ${PDCHECK_BENCH_ARGS-$default_bench_args} \
        --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
    bench_rc=${PIPESTATUS[0]}
else
    echo "gpu_tier: bench skipped: needs a CUDA GPU, found none" | tee "$out/bench.log"
fi

sanitizer_rc=0
if [ -n "${PDCHECK_SANITIZER:-}" ] && runs sanitizer; then
    if [ "$gpus" -lt 1 ]; then
        echo "sanitizer skipped: the reference tests need a CUDA GPU, found none" >runs/sanitizer.txt
    elif ! sanitizer=$(find_sanitizer); then
        echo "sanitizer: compute-sanitizer not found on PATH or in /usr/local/cuda*/bin" >runs/sanitizer.txt
        sanitizer_rc=1
    else
        echo "gpu_tier: $sanitizer ($PDCHECK_SANITIZER) on $SANITIZER_TESTS"
        sanitizer_step || sanitizer_rc=1
    fi
fi

{
    echo "GPU tier on $gpus GPU(s), steps:$steps"
    echo "env: $(tail -1 "$out/env.txt")"
    echo "NCCL pairs: $pairing"
    if runs tests; then
        echo "tests: exit $tests_rc: $(junit_counts "$out/gpu-junit.xml")"
        race_lines "$out/gpu-junit.xml"
    fi
    if [ -n "${PDCHECK_SANITIZER:-}" ] && runs sanitizer; then
        echo "sanitizer (exit $sanitizer_rc) on $SANITIZER_TESTS:"
        cat runs/sanitizer.txt
    fi
    if runs bench; then
        echo "bench: exit $bench_rc"
        grep -A16 "^NCCL plane" "$out/bench.log" || true
    fi
} | tee "$out/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$sanitizer_rc" -eq 0 ]
