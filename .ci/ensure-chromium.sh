#!/usr/bin/env bash
# Make sure Debian's Chromium is at /usr/bin/chromium for the browser tests
# (tests/test_web_page.py). Playwright drives that binary; it never downloads a
# browser of its own, so a fresh machine only needs Debian's package.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "installing chromium from Debian's packages" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >&2
test -x /usr/bin/chromium || { echo "chromium did not install at /usr/bin/chromium" >&2; exit 1; }
