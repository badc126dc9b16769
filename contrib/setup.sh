#!/usr/bin/env bash
# Everything snapfs needs on a fresh Debian 12 (run as root): qemu-utils, FUSE 3 and the
# headers pyfuse3 builds against, qemu-system-x86 and gcc + libc6-dev (the running-VM tests;
# their guest's I/O probe is built with gcc -static), then a venv in .venv with snapfs and
# its test extras.
# Safe to run again; it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-utils fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-dev python3-venv libvirt-clients qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
log=$(mktemp)
if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
rm -f "$log"
# pip compiles the packages it installs but not the editable source; a clean clone gets its
# bytecode here, so the first `snapfs` command does not pay for compiling.
.venv/bin/python -m compileall -q snapfs >/dev/null
