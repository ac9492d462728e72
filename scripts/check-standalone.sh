#!/usr/bin/env bash
# Each service must install with only what it declares: sync it alone into its own environment
# (no dev group, no other members) and import its entry module there.
set -euo pipefail
cd "$(dirname "$0")/.."
for dir in services/*/; do
  name="$(basename "$dir")"
  module="${name//-/_}"
  env_dir=".venv-standalone/$name"
  UV_PROJECT_ENVIRONMENT="$env_dir" scripts/uv.sh sync --locked --package "$name" --no-dev --quiet
  "$env_dir/bin/python" -c "import importlib; importlib.import_module('$module.__main__')"
done
echo "standalone: every service imports with only its declared dependencies"
