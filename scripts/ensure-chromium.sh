#!/usr/bin/env bash
# Makes sure Debian's Chromium is installed for the browser tests (tests/e2e).
#
# Playwright never downloads a browser here (the test machines have no internet, only the package
# registries): the tests drive the distribution's /usr/bin/chromium instead. When it is missing
# and we are root with apt-get, install the Debian package; otherwise say what to do and exit
# non-zero (the tests then skip with that reason instead of failing).
#
# CHROMIUM (environment) overrides the path that is checked.
set -euo pipefail
chromium="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$chromium" ]; then
  echo "ensure-chromium: $chromium is installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-chromium: $chromium is missing and we are not root;" \
    "install Debian's package yourself: sudo apt-get install --no-install-recommends chromium" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: $chromium is missing and there is no apt-get on this machine;" \
    "install Chromium and point CHROMIUM at its executable" >&2
  exit 1
fi

echo "ensure-chromium: installing Debian's chromium package" >&2
export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent (fresh image) or stale (removed versions answer 404).
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium >&2
if [ ! -x "$chromium" ]; then
  echo "ensure-chromium: apt-get installed chromium but $chromium is still missing" >&2
  exit 1
fi
echo "ensure-chromium: installed $("$chromium" --version 2>/dev/null || echo "$chromium")"
