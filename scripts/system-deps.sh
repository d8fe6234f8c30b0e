#!/usr/bin/env bash
# Installs the system packages the project needs when they are missing (Debian/Ubuntu):
# libmagic (python-magic) and redis-server (embedded Redis, tests with restarts); with the
# argument "test" also Debian's chromium (the status page is tested in headless Chromium); with
# "bench-dataset" also nginx (the static file server the dataset API's image serving is measured
# against).
set -euo pipefail
need=()
if [ "${1:-}" = "test" ]; then
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
fi
if [ "${1:-}" = "bench-dataset" ]; then
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
fi
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ! ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1'; then need+=(libmagic1); fi
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing system packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
