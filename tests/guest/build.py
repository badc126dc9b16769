"""Builds (once, then cached) the tiny test guest of DESIGN section 8.

Debian's cloud kernel and busybox-static come from apt (`apt-get download` + `dpkg-deb -x`);
the initramfs (cpio newc, gzip, about 1.3 MiB) is written by Python. Its /init loads the virtio
modules, draws a random boot tag, and then writes one 512-byte counter record per step to
every /dev/vd* disk (block N at offset N*512, fsynced), printing `C <N>` on the serial
console after each step, until the disks are full. The pause between steps is STEP_USECONDS,
or `snapfs.step=<microseconds>` on the kernel command line.

With `snapfs.probe=<disk>` on the kernel command line the init also starts the I/O probe
(probe.c, compiled here with `gcc -static -O2`) on that disk before the counter: it rewrites
one 4 KiB block 1 MiB before the disk's end (never reached by the counter) and prints its
latencies as `P ...` lines (see probe.c). `snapfs.probe_sync=0|1` (O_DSYNC, default 0),
`snapfs.probe_slow=<us>`, `snapfs.probe_every=<ms>` and `snapfs.probe_pause=<us>` tune it. Without `snapfs.probe` the
guest is the same as before it existed.

The cache directory (``$SNAPFS_GUEST_CACHE`` or /var/cache/snapfs-test-guest) holds one
directory per kernel package version and init revision; it is built only when missing.
Run ``python -m tests.guest.build`` to build it ahead (it prints the two paths).
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("SNAPFS_GUEST_CACHE", "/var/cache/snapfs-test-guest"))
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Bump when the init script, probe.c or the archive layout changes: it is part of the cache key.
INIT_REVISION = 4
MODULES = ("virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk")
MAGIC = "SNAPFSCTR"
STEP_USECONDS = 50_000
PROBE_SOURCE = Path(__file__).with_name("probe.c")

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The order the modules need changes between kernel builds: retry the list until all load
# (quietly: each failed try logs its unknown symbols).
echo 1 > /proc/sys/kernel/printk
left="@MODULES@"
round=0
while [ -n "$left" ] && [ $round -lt 10 ]; do
  next=""
  for m in $left; do
    insmod /lib/modules/$m.ko 2>/dev/null || next="$next $m"
  done
  left=$next
  round=$((round + 1))
done
[ -n "$left" ] && echo "snapfs-guest: modules not loaded:$left"
disks=""
for b in /sys/block/vd*; do
  [ -e "$b" ] && disks="$disks ${b##*/}"
done
for d in $disks; do
  i=0
  while [ ! -b /dev/$d ] && [ $i -lt 100 ]; do usleep 20000; i=$((i + 1)); done
done
# The pace: snapfs.step=<microseconds> on the kernel command line (0: as fast as it can).
step=@STEP@
for word in $(cat /proc/cmdline); do
  case "$word" in snapfs.step=*) step=${word#snapfs.step=} ;; esac
done
probe="" probe_sync=0 probe_slow=3000 probe_every=250 probe_pause=1000
for word in $(cat /proc/cmdline); do
  case "$word" in
    snapfs.probe=*) probe=${word#snapfs.probe=} ;;
    snapfs.probe_sync=*) probe_sync=${word#snapfs.probe_sync=} ;;
    snapfs.probe_slow=*) probe_slow=${word#snapfs.probe_slow=} ;;
    snapfs.probe_every=*) probe_every=${word#snapfs.probe_every=} ;;
    snapfs.probe_pause=*) probe_pause=${word#snapfs.probe_pause=} ;;
  esac
done
tag=$(cut -c1-8 /proc/sys/kernel/random/uuid)
echo "snapfs-guest: boot $tag disks$disks"
if [ -n "$probe" ]; then
  echo "snapfs-guest: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
  /bin/probe "$probe" "$probe_sync" "$probe_slow" "$probe_every" "$probe_pause" &
fi
n=0
while [ -n "$disks" ]; do
  for d in $disks; do
    if ! printf '@MAGIC@ %s %s %d\n' "$tag" "$d" "$n" \
        | dd of=/dev/$d bs=512 seek=$n count=1 conv=sync,notrunc,fsync 2>/dev/null; then
      echo "snapfs-guest: stopped: write $d $n failed"
      disks=""
    fi
  done
  [ -n "$disks" ] && echo "C $n"
  n=$((n + 1))
  [ "$step" -gt 0 ] && usleep "$step"
done
while :; do sleep 3600; done
"""


def guest_files(refresh: bool = bool(os.environ.get("SNAPFS_GUEST_REFRESH"))) -> tuple[Path, Path]:
    """(kernel, initrd) of the test guest, built into the cache first if missing.

    A cached build of this init revision is used without asking apt (apt-cache takes seconds
    on a busy machine); `refresh` (or $SNAPFS_GUEST_REFRESH) builds for apt's current kernel."""
    if not refresh:
        cached = sorted(CACHE_DIR.glob(f"*_init{INIT_REVISION}/initrd.gz"), key=lambda p: p.stat().st_mtime)
        if cached and (cached[-1].parent / "vmlinuz").is_file():
            return cached[-1].parent / "vmlinuz", cached[-1]
    package, version = _kernel_package()
    target = CACHE_DIR / f"{package}_{version}_init{INIT_REVISION}"
    kernel, initrd = target / "vmlinuz", target / "initrd.gz"
    if not (kernel.is_file() and initrd.is_file()):
        _build(package, target)
    return kernel, initrd


def _run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _kernel_package() -> tuple[str, str]:
    """The versioned kernel package the meta package depends on, and its candidate version."""
    package = None
    for line in _run("apt-cache", "depends", KERNEL_META_PACKAGE).splitlines():
        key, _, value = line.strip().partition(": ")
        if key == "Depends" and value.startswith("linux-image-"):
            package = value.strip()
            break
    if package is None:
        raise RuntimeError(f"apt-cache names no kernel package for {KERNEL_META_PACKAGE}")
    for line in _run("apt-cache", "show", "--no-all-versions", package).splitlines():
        if line.startswith("Version: "):
            return package, line.removeprefix("Version: ").strip()
    raise RuntimeError(f"apt-cache shows no version of {package}")


def _build(package: str, target: Path) -> None:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=".build-") as tmp:
        work = Path(tmp)
        _run("apt-get", "download", package, BUSYBOX_PACKAGE, cwd=work)
        root = work / "root"
        for deb in work.glob("*.deb"):
            _run("dpkg-deb", "-x", str(deb), str(root))
        out = work / "out"
        out.mkdir()
        _run("gcc", "-static", "-O2", "-Wall", "-o", str(work / "probe"), str(PROBE_SOURCE))
        shutil.copyfile(_one(root.glob("boot/vmlinuz-*")), out / "vmlinuz")
        initramfs = _initramfs(root, (work / "probe").read_bytes())
        (out / "initrd.gz").write_bytes(gzip.compress(initramfs, 9, mtime=0))
        try:
            out.rename(target)
        except OSError:
            if not target.is_dir():  # else another builder won the race
                raise


def _one(paths) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise RuntimeError(f"expected one file, found {found}")
    return found[0]


def _module_files(root: Path) -> dict[str, bytes]:
    """name -> uncompressed .ko bytes (busybox insmod does not decompress xz)."""
    found: dict[str, bytes] = {}
    for path in root.glob("lib/modules/*/kernel/drivers/**/*.ko*"):
        name = path.name.split(".ko")[0]
        if name in MODULES:
            data = path.read_bytes()
            found[name] = lzma.decompress(data) if path.name.endswith(".xz") else data
    if "virtio_blk" not in found and not _builtin(root, "virtio_blk"):
        raise RuntimeError("the kernel package has no virtio_blk module")
    return found


def _builtin(root: Path, name: str) -> bool:
    return any(f"/{name}.ko" in p.read_text() for p in root.glob("lib/modules/*/modules.builtin"))


def _initramfs(root: Path, probe: bytes) -> bytes:
    modules = _module_files(root)
    init = (
        INIT_SCRIPT.replace("@MODULES@", " ".join(m for m in MODULES if m in modules))
        .replace("@MAGIC@", MAGIC)
        .replace("@STEP@", str(STEP_USECONDS))
    )
    archive = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "lib", "lib/modules"):
        archive.add(d, 0o040755)
    archive.add("dev/console", 0o020600, rdev=(5, 1))
    archive.add("bin/busybox", 0o100755, (root / "bin/busybox").read_bytes())
    archive.add("bin/probe", 0o100755, probe)
    archive.add("init", 0o100755, init.encode())
    for name, data in modules.items():
        archive.add(f"lib/modules/{name}.ko", 0o100644, data)
    return archive.finish()


class _Cpio:
    """A cpio archive in the "newc" format the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self._ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._parts += [header, _pad(len(header)), data, _pad(len(data))]

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


if __name__ == "__main__":
    print(*guest_files())
