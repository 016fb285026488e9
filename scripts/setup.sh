#!/usr/bin/env bash
# Set up a fresh machine for fastsemdiff: a virtual environment in .venv, the package (editable),
# and the Fashion-MNIST data. `--dev` adds the test and benchmark tools.
#   bash scripts/setup.sh          # to train and evaluate
#   bash scripts/setup.sh --dev    # to run the tests
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,dali]"

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"

data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: Fashion-MNIST is not installed. Run 'sudo apt-get install dataset-fashion-mnist'," >&2
        echo "       or put its four idx.gz files in a folder and pass data.path=THAT_FOLDER to the trainer." >&2
    fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
