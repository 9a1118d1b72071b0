#!/usr/bin/env bash
# Debian packages that some tests drive for real (a browser, a load balancer, promtool).
# `make test` runs this first. Where apt-get is missing or fails (no root, no network), it says so
# and the tests that need a missing tool are skipped with a message naming it.
# One line per package: "<package> <a command it provides>".
set -u
PACKAGES="
chromium chromium
chromium-driver chromedriver
haproxy haproxy
prometheus promtool
"
missing=()
while read -r package command; do
  [ -n "${package:-}" ] || continue
  command -v "$command" >/dev/null 2>&1 || missing+=("$package")
done <<< "$PACKAGES"
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "system-deps: cannot install ${missing[*]} (needs apt-get as root); tests that need them are skipped"
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "system-deps: apt-get could not install ${missing[*]}; tests that need them are skipped"
fi
exit 0
