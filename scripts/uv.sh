#!/usr/bin/env bash
# Runs the pinned uv, installing it into .tools/ first when the machine has none.
# A fresh machine needs only python3 (>= 3.11) with venv and pip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
UV_VERSION="0.13.9"
export UV_PYTHON_DOWNLOADS="${UV_PYTHON_DOWNLOADS:-never}"  # use the machine's Python; no downloads
# Trust the operating system's certificate store (public roots, plus a company's TLS-inspecting
# CA where there is one) instead of only uv's bundled Mozilla roots.
export UV_SYSTEM_CERTS="${UV_SYSTEM_CERTS:-1}"
if command -v uv >/dev/null 2>&1; then
  exec uv "$@"
fi
if [ ! -x "$root/.tools/bin/uv" ]; then
  python3 -m venv "$root/.tools" >&2
  "$root/.tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
fi
exec "$root/.tools/bin/uv" "$@"
