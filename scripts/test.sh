#!/usr/bin/env bash
# The test command: installs what a fresh Debian machine lacks (Debian packages when run
# as root, Python packages in .venv), then runs lint (ruff), types (mypy) and the tests,
# kernel tests in network namespaces and the IPVS suite in a VM included.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k golden`.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  nftables libnftables1 iptables ipset ipvsadm conntrack iproute2
  # `python3 -m venv` below, with Debian's own Python.
  python3-venv
  # The IPVS suite (tests/vm): a QEMU guest booting Debian's generic kernel through
  # vng, whose initramfs needs a static busybox.
  qemu-system-x86 linux-image-amd64 busybox-static
)
if [ "$(id -u)" = 0 ]; then
  missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
else
  echo "test.sh: not root: Debian packages not installed; kernel tests will skip" >&2
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# An outside package that adds a backend through the `lbc` entry point group.
.venv/bin/python -m pip install -q --disable-pip-version-check -e tests/plugin_pkg
export PATH="$PWD/.venv/bin:$PATH"
# As root everything the IPVS VM suite needs was installed above: there it must run,
# and a missing piece fails the suite instead of skipping it.
if [ "$(id -u)" = 0 ]; then
  export LBC_VM_REQUIRED=1
fi

ruff check .
ruff format --check .
mypy
python -m pytest "$@"
