#!/usr/bin/env bash
# The torch/Triton version matrix: one virtual environment per pair, each with the project
# installed from this checkout, running the kernel, functional, module, op, version and masked-layer tests
# through Triton's interpreter, then `python -m perf host` (the real sm_90 compile and C launch
# path against a stub libcuda) and its tests. Prints a pass/fail table with timings; exits
# non-zero if any pair fails.
#
#   bash .ci/versions.sh                 every pair below (CI)
#   bash .ci/versions.sh floor newest    the named pairs
#
# The floor and newest pairs are required; the others are skipped, not failed, on a disk with
# too little room for them.
#
# Environment: TRITON_BN_VENVS (default ~/.cache/triton_bn-ci) holds the environments, reused
# while their torch, Triton and numpy still match; TRITON_BN_VERSION_TESTS replaces the test
# list; TRITON_BN_VERSION_WORKERS (default 2) is pytest-xdist's worker count.
#
# torch's PyPI wheels for x86_64 are CUDA builds with their nvidia-* libraries: 4.7-6.8 GB per
# environment, 1-3 minutes of download and install each. They import and run on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENVS=${TRITON_BN_VENVS:-$HOME/.cache/triton_bn-ci}
WORKERS=${TRITON_BN_VERSION_WORKERS:-2}
TESTS=${TRITON_BN_VERSION_TESTS:-tests/test_kernels.py tests/test_functional.py tests/test_modules.py tests/test_ops.py tests/test_versions.py tests/test_perf_host.py tests/test_masked_layers.py}

# name  python  torch  triton  numpy (Triton 3.5/3.6's interpreter fails with numpy >= 2.4)
# sm90: the GPU machine's pair; t2.12: Triton 3.7; t2.14: the newest torch on this machine's
# disk (pip's cap here). One pair per Triton minor version, Pythons 3.10 to 3.13.
PAIRS="floor 3.10 2.9.1 3.5.1 numpy<2.4
newest 3.13 2.15.0 3.9.0 numpy
sm90 3.11 2.11.0 3.6.0 numpy<2.4
t2.12 3.12 2.12.1 3.7.1 numpy
t2.14 3.11 2.14.1 3.8.0 numpy"

REQUIRED="floor newest"
if [ $# -eq 0 ] || [ "$1" = all ]; then set -- $(echo "$PAIRS" | cut -d' ' -f1); fi

find_python() {  # find_python 3.10 -> a python3.10 executable, or nothing
    local candidate
    for candidate in "$(command -v "python$1" 2>/dev/null)" /root/.pyenv/versions/"$1".*/bin/python \
                     /usr/local/bin/python"$1" /usr/bin/python"$1"; do
        # (a pyenv shim exists for every version but runs only the selected ones)
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import venv' >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
}

pip_env() {  # the pip configuration a pair needs: this machine's, unless its torch cap refuses the pair's torch
    local cap
    cap=$(sed -n 's/^torch<=//p' /etc/xdg/pip/constraints.txt 2>/dev/null | head -n1)
    if [ -n "$cap" ] && [ "$(printf '%s\n%s\n' "$cap" "$1" | sort -V | tail -n1)" != "$cap" ]; then
        echo PIP_CONFIG_FILE=/dev/null
    else
        echo TRITON_BN_PIP=default  # a no-op setting for env
    fi
}

matches() {  # matches VENV_PYTHON TORCH TRITON NUMPY_SPEC: the environment has them
    "$1" - "$2" "$3" "$4" <<'EOF' 2>/dev/null
import sys
import numpy, torch, triton
torch_v, triton_v, numpy_spec = sys.argv[1:]
ok = torch.__version__.split("+")[0] == torch_v and triton.__version__ == triton_v
if numpy_spec.startswith("numpy<"):
    bound = tuple(int(p) for p in numpy_spec[len("numpy<"):].split("."))
    ok = ok and tuple(int(p) for p in numpy.__version__.split(".")[:len(bound)]) < bound
sys.exit(0 if ok else 1)
EOF
}

seconds() { echo $(( $(date +%s) - $1 )); }

RESULTS=()
PASSED=0
FAILED=0
for wanted in "$@"; do
    line=$(echo "$PAIRS" | awk -v n="$wanted" '$1 == n')
    if [ -z "$line" ]; then
        echo "unknown pair '$wanted' (pairs: $(echo "$PAIRS" | cut -d' ' -f1 | xargs))" >&2
        exit 2
    fi
    read -r name pyver torch_v triton_v numpy_spec <<<"$line"
    echo "=== $name: torch $torch_v, Triton $triton_v, Python $pyver, $numpy_spec"
    python=$(find_python "$pyver")
    if [ -z "$python" ]; then
        python=$(command -v python3)
        echo "no Python $pyver here: using $python ($("$python" -c 'import platform; print(platform.python_version())'))"
    fi
    if ! pyfull=$("$python" -c 'import platform; print(platform.python_version())'); then
        RESULTS+=("$name: no Python to build it with: FAIL")
        FAILED=$((FAILED + 1))
        continue
    fi
    venv="$VENVS/torch-$torch_v-triton-$triton_v-py$(echo "$pyfull" | cut -d. -f1,2)"
    build="reused"
    status="PASS"
    tests_summary="-"
    host_summary="-"
    start=$(date +%s)
    env_setting=$(pip_env "$torch_v")
    if ! [ -x "$venv/bin/python" ] || ! matches "$venv/bin/python" "$torch_v" "$triton_v" "$numpy_spec"; then
        rm -rf "$venv"
        mkdir -p "$VENVS"
        free_gb=$(( $(df -Pk "$VENVS" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
        if [ "$free_gb" -lt 10 ]; then
            echo "only $free_gb GB free under $VENVS: a CUDA build of torch needs ~7 GB" >&2
            case " $REQUIRED " in *" $name "*) status="FAIL (disk)" ;; *) status="SKIP (disk)" ;; esac
        elif ! "$python" -m venv "$venv" \
            || ! env "$env_setting" "$venv/bin/python" -m pip install -q --progress-bar off \
                 "torch==$torch_v" "triton==$triton_v" "$numpy_spec"; then
            status="FAIL (install)"
        fi
        build="$(seconds "$start") s"
    fi
    # The project from this checkout, with its test extras: pip checks that pyproject's ranges
    # admit the pair (a pair they exclude fails here).
    if [ "$status" = PASS ]; then
        step=$(date +%s)
        if ! env "$env_setting" "$venv/bin/python" -m pip install -q --progress-bar off -e "$ROOT[test]" \
             "torch==$torch_v" "triton==$triton_v" "$numpy_spec"; then
            status="FAIL (pip install -e .[test])"
        fi
        [ "$build" = reused ] && build="reused, $(seconds "$step") s" || build="$build + $(seconds "$step") s"
    fi
    if [ "$status" = PASS ]; then
        step=$(date +%s)
        mkdir -p "$VENVS/logs"
        log="$VENVS/logs/$name-tests.log"
        # shellcheck disable=SC2086
        timeout 1800 "$venv/bin/python" -m pytest -n "$WORKERS" -q -p no:cacheprovider -W ignore::DeprecationWarning \
            $TESTS >"$log" 2>&1
        rc=$?
        tests_summary="$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n1 \
            | sed 's/=//g; s/ in [0-9.]*s.*//; s/, [0-9]* warnings*//; s/^ *//') ($(seconds "$step") s)"
        if [ $rc -ne 0 ]; then
            status="FAIL (tests)"
            tail -n 40 "$log"
        fi
    fi
    if [ "$status" = PASS ]; then
        step=$(date +%s)
        out=$(mktemp -d)
        if timeout 600 "$venv/bin/python" -m perf host --out "$out" --reps 50 --warmup 3 >"$out/log" 2>&1; then
            host_summary="$(sed -n 's/^launch path: \([^ ]*\).*/\1/p' "$out/log") ($(seconds "$step") s)"
        else
            status="FAIL (perf host)"
            tail -n 40 "$out/log"
        fi
        rm -rf "$out"
    fi
    case "$status" in PASS) PASSED=$((PASSED + 1)) ;; SKIP*) ;; *) FAILED=$((FAILED + 1)) ;; esac
    RESULTS+=("$(printf '%-7s %-7s %-6s %-8s %-10s %-17s %-36s %-19s %s' "$name" "$torch_v" "$triton_v" "$pyfull" \
        "$numpy_spec" "$build" "$tests_summary" "$host_summary" "$status")")
done

echo
printf '%-7s %-7s %-6s %-8s %-10s %-17s %-36s %-19s %s\n' pair torch triton python numpy venv tests "perf host" result
for row in "${RESULTS[@]}"; do echo "$row"; done
echo "versions: $PASSED passed, $FAILED failed"  # pairs
[ "$FAILED" -eq 0 ]
