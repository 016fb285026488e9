#!/usr/bin/env bash
# Set up a fresh machine for fastsemdiff: a virtual environment in .venv, the package (editable),
# and the Fashion-MNIST data. `--dev` adds the test and benchmark tools, and a second environment
# .venv-gpu-image with the GPU machines' stack (torch 2.11.0, triton 3.6.0), so the tests run on both.
#   bash scripts/setup.sh          # to train and evaluate
#   bash scripts/setup.sh --dev    # to run the tests (on both stacks)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,dali]"

# Each environment holds torch with its CUDA libraries: about 6.5 GB once installed, more while pip unpacks. A full
# disk used to end setup with a bare exit status from pip; say so first, where the fix is obvious.
# FASTSEMDIFF_SETUP_MIN_GB (default 6: less than what an environment takes, so only a certain failure is refused)
# sets the free space asked for per environment (0: no check).
new_env() {  # new_env DIR [N]: make the virtual environment DIR unless it exists, on a disk with room for N (1) of them
    local need_gb=$((${FASTSEMDIFF_SETUP_MIN_GB:-6} * ${2:-1})) free_kb mount
    [ -x "$1/bin/python" ] && return 0  # an existing environment is only updated
    read -r free_kb mount < <(df -Pk . | awk 'NR == 2 {print $4, $6}')
    if [ "$need_gb" != 0 ] && [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
        echo "setup: only $((free_kb / 1024 / 1024)) GB free on $mount, and $1 (torch with its CUDA libraries) needs" \
             "more than $need_gb GB. Free some space (old clones, ~/.cache/pip) and run setup again, or set" \
             "FASTSEMDIFF_SETUP_MIN_GB to ask for less." >&2
        exit 1
    fi
    "$python" -m venv "$1"
}

room=1; [ -x .venv/bin/python ] || room=2  # a fresh .venv installs beside the second environment
new_env .venv

# The GPU machines' stack (../.library/device/KINDS.md: torch 2.11.0+cu130, triton 3.6.0, no DALI), in a second
# environment for the tests (--dev only; GPU_IMAGE_STACK=0 skips it). Its torch downloads and unpacks in the
# background while .venv installs and builds its extension (network and disk beside the compiler), so the second
# environment costs CI less than its own sum; the rest of it is set up after .venv, below.
gpu=.venv-gpu-image
gpu_torch_pid=""
if [ -n "$extras" ] && [ "${GPU_IMAGE_STACK:-1}" != 0 ]; then
    new_env "$gpu" "$room"
    gpu_log=$(mktemp)
    "$gpu/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.11.0 triton==3.6.0 \
        "setuptools>=64" wheel ninja >"$gpu_log" 2>&1 &
    gpu_torch_pid=$!
    trap '[ -n "$gpu_torch_pid" ] && kill "$gpu_torch_pid" 2>/dev/null; true' EXIT  # setup failed: stop it too
fi

.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"

# The CUDA C++ extension (csrc/ -> fastsemdiff._C) builds against the installed torch, so the package is
# installed once more without build isolation: setup.py builds the extension where nvcc and a CUDA build of
# torch are present and otherwise says why in one line (FASTSEMDIFF_BUILD_CUDA=0 skips it, =1 insists).
# A machine without a GPU has no use for the extension when training (2-3 minutes of build on 2 cores), so it
# is built there only with --dev (the tests check the build) or when FASTSEMDIFF_BUILD_CUDA says so.
if [ -z "${FASTSEMDIFF_BUILD_CUDA:-}" ] && [ -z "$extras" ] && ! nvidia-smi -L >/dev/null 2>&1; then
    export FASTSEMDIFF_BUILD_CUDA=0
    echo "setup: no GPU here, so the CUDA extension is not built (FASTSEMDIFF_BUILD_CUDA=1 builds it anyway)"
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "setuptools>=64" wheel ninja
build_log=$(mktemp)
if ! .venv/bin/python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . \
        >"$build_log" 2>&1; then
    tail -n 80 "$build_log" >&2
    echo "setup: installing fastsemdiff (and building fastsemdiff._C) failed; the end of its log is above" >&2
    exit 1
fi
sed -n 's/^[[:space:]]*\(fastsemdiff: .*\)$/\1/p' "$build_log" | awk '!seen[$0]++'  # the build's own lines
rm -f "$build_log"
echo "setup: .venv ready after ${SECONDS} s"  # the seconds since setup began: where a slow CI's minutes went

# The rest of the GPU machines' stack, once its torch is in. The package is installed there as a regular (not
# editable) copy, so its fastsemdiff._C is built against torch 2.11 and sits beside that copy instead of replacing
# the one of .venv in the source tree (both have one file name); the tests run it with PYTHONSAFEPATH=1 so the
# source tree does not shadow it. Re-run setup after changing the code to refresh the copy. DALI is left out (the
# image has none; its tests skip, saying so). The extension is built for sm_90 (the H200) only, to keep CI short:
# the build and registration tests need it built, and both stacks use the same nvcc, so the machine code of both
# architectures is read from .venv's build.
if [ -n "$gpu_torch_pid" ]; then
    torch_ok=1
    wait "$gpu_torch_pid" || torch_ok=0
    gpu_torch_pid=""
    if [ "$torch_ok" = 0 ]; then
        tail -n 80 "$gpu_log" >&2
        echo "setup: installing torch 2.11.0 and triton 3.6.0 into $gpu failed; the end of its log is above" >&2
        exit 1
    fi
    echo "setup: $gpu has torch 2.11.0 after ${SECONDS} s (installed beside .venv)"
    # the dependencies (and a first copy without the extension), then the copy with it, built against torch 2.11
    if ! "$gpu/bin/python" -m pip install --quiet --disable-pip-version-check ".[dev]" >>"$gpu_log" 2>&1 ||
       ! TORCH_CUDA_ARCH_LIST="${GPU_IMAGE_ARCH_LIST:-9.0}" "$gpu/bin/python" -m pip install -v \
            --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps . >>"$gpu_log" 2>&1; then
        tail -n 80 "$gpu_log" >&2
        echo "setup: installing fastsemdiff into $gpu (torch 2.11.0, triton 3.6.0) failed; the end of its log is above" >&2
        exit 1
    fi
    sed -n 's/^[[:space:]]*\(fastsemdiff: .*\)$/\1/p' "$gpu_log" | awk '!seen[$0]++' | sed "s|^|$gpu: |"
    rm -f "$gpu_log"
    echo "setup: $gpu ready after ${SECONDS} s ($("$gpu/bin/python" -P -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
fi

# System packages the main job needs: the data, and a C++ compiler because the main job compiles its CPU step
# (train.compile=on: ~1.2x the images/s of eager, bench/RESULTS.md; the trainer refuses up front without one).
# Both are installed with one apt-get update when this runs as root; otherwise the commands are printed.
data=/usr/share/datasets/fashion-mnist
missing=()
[ -f "$data/train-images-idx3-ubyte.gz" ] || missing+=(dataset-fashion-mnist)
command -v g++ >/dev/null || command -v c++ >/dev/null || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing ${missing[*]} (Debian packages)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        for pkg in "${missing[@]}"; do
            case $pkg in
            dataset-fashion-mnist)
                echo "setup: Fashion-MNIST is not installed. Run 'sudo apt-get install dataset-fashion-mnist'," >&2
                echo "       or put its four idx.gz files in a folder and pass data.path=THAT_FOLDER to the trainer." >&2 ;;
            g++)
                echo "setup: no C++ compiler: the main job compiles its CPU step. Run 'sudo apt-get install g++', or pass" >&2
                echo "       train.compile=off to the trainer (the same model, ~1.2x slower)." >&2 ;;
            esac
        done
    fi
fi
echo "setup: done after ${SECONDS} s ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
