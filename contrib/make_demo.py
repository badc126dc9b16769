"""Build the demo store: domain vm1 with one qcow2 disk and a few snapshots.

Usage: make_demo.py DEMO_DIR   (makes DEMO_DIR/images, DEMO_DIR/store, DEMO_DIR/mnt)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import snapfs


def qemu_io_write(path: str, pattern: int, offset_mib: int) -> None:
    cmd = f"write -P {pattern:#x} {offset_mib}M 1M"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], check=True, capture_output=True)


def main(demo: str) -> None:
    mnt = os.path.join(demo, "mnt")
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", mnt], check=False)
    for sub in ("images", "store"):
        shutil.rmtree(os.path.join(demo, sub), ignore_errors=True)
    os.makedirs(os.path.join(demo, "images"))
    os.makedirs(mnt, exist_ok=True)
    base = os.path.join(demo, "images", "vm1.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)

    store = snapfs.open_store(os.path.join(demo, "store"), create=True)
    dom = store.define("vm1", [("vda", base, "qcow2")])
    live = dom.core.live_path("vda")
    qemu_io_write(live, 0x11, 0)
    dom.snapshot_create_xml(
        "<domainsnapshot><name>fresh-install</name><description>Debian 12 just installed</description></domainsnapshot>"
    )
    qemu_io_write(live, 0x22, 1)
    dom.snapshot_create_xml(
        "<domainsnapshot><name>before-upgrade</name><description>kernel 6.1 to 6.6</description></domainsnapshot>"
    )
    qemu_io_write(live, 0x33, 2)
    print(f"demo store: {store.path} (domain vm1, snapshots fresh-install <- before-upgrade, live disk changed)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/snapfs-demo")
