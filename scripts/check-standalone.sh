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
  # every module of the service, so a missing declared dependency fails here
  "$env_dir/bin/python" - "$module" <<'PY'
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
importlib.import_module(sys.argv[1] + ".__main__")
PY
done
echo "standalone: every service imports with only its declared dependencies"
