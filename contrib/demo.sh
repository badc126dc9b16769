#!/usr/bin/env bash
# The main job: set up, build a demo store with a sample domain, and mount it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
demo=${SNAPFS_DEMO_DIR:-/tmp/snapfs-demo}
.venv/bin/python contrib/make_demo.py "$demo"
.venv/bin/snapfs --store "$demo/store" mount "$demo/mnt"
cat <<EOT
snapfs is mounted at $demo/mnt (store: $demo/store). Try:
  ls $demo/mnt/vm1/snapshots
  cat $demo/mnt/vm1/snapshots/before-upgrade/xml
  mkdir $demo/mnt/vm1/snapshots/after-upgrade
  echo "upgrade done" > $demo/mnt/vm1/snapshots/after-upgrade/description
  echo merge > $demo/mnt/vm1/snapshots/before-upgrade/control
  echo revert > $demo/mnt/vm1/snapshots/fresh-install/control
  echo bogus > $demo/mnt/vm1/snapshots/fresh-install/control; cat $demo/mnt/vm1/last-error
  .venv/bin/snapfs --store $demo/store snapshot-list vm1 --tree
Unmount with: fusermount3 -u $demo/mnt
EOT
