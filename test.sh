#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Rust, Python 3 and pip.
# Installs the real peers the tests run against (nginx, HAProxy, Prometheus,
# waitress, gunicorn, ...), then runs fmt, clippy and every test.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(nginx-light haproxy prometheus wrk nghttp2-client curl openssl dnsmasq-base kubectl chromium)
PIP_PACKAGES=(waitress gunicorn gevent django kubernetes-validate)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's nginx and prometheus packages start system services on install; the
# tests run their own instances on ephemeral loopback ports, so stop those.
for svc in nginx prometheus haproxy prometheus-node-exporter; do
  (command -v systemctl >/dev/null && systemctl stop "$svc" 2>/dev/null) || true
  (command -v service >/dev/null && service "$svc" stop >/dev/null 2>&1) || true
done

if ! python3 -c "import waitress, gunicorn, gevent, django, kubernetes_validate" 2>/dev/null; then
  echo "== installing Python packages: ${PIP_PACKAGES[*]}"
  python3 -m pip install -q "${PIP_PACKAGES[@]}" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "${PIP_PACKAGES[@]}"
fi
# Usher's own WSGI middleware, from the repo on every run, so the installed
# copy is never older than the source (the e2e tests import the source itself).
echo "== installing usher-wsgi from ./worker/python"
python3 -m pip install -q --upgrade ./worker/python 2>/dev/null \
  || python3 -m pip install -q --upgrade --break-system-packages ./worker/python
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo build --workspace --bins
cargo test --workspace
