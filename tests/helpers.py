"""Test helpers: real images, byte patterns written and checked with qemu-io."""

from __future__ import annotations

import hashlib
import os
import subprocess

MiB = 1 << 20
DISK_SIZE = 4 * MiB
CLUSTER = 64 * 1024


def make_image(path: str, fmt: str, size: int = DISK_SIZE) -> str:
    args = ["qemu-img", "create", "-q", "-f", fmt]
    if fmt == "qcow2":
        args += ["-o", f"cluster_size={CLUSTER}"]
    subprocess.run([*args, path, str(size)], check=True)
    return path


def write_pattern(path: str, pattern: int, offset: int, length: int = CLUSTER, fmt: str = "qcow2") -> None:
    run = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", path],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "error" not in run.stdout.lower(), run.stdout + run.stderr


def has_pattern(path: str, pattern: int, offset: int, length: int = CLUSTER, fmt: str = "qcow2") -> bool:
    run = subprocess.run(
        ["qemu-io", "-r", "-f", fmt, "-c", f"read -P {pattern:#x} {offset} {length}", path],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return "Pattern verification failed" not in run.stdout and "error" not in run.stdout.lower()


def read_raw(path: str, fmt: str = "qcow2") -> bytes:
    """The whole content of an image (with its backing chain) as raw bytes."""
    out = path + ".check.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out], check=True)
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def expected_content(writes: dict[int, int], size: int = DISK_SIZE) -> bytes:
    """Image content from {offset: pattern} cluster writes over zeros."""
    data = bytearray(size)
    for offset, pattern in writes.items():
        data[offset : offset + CLUSTER] = bytes([pattern]) * CLUSTER
    return bytes(data)


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_fingerprint(root: str) -> dict[str, str]:
    """Every file under root with its checksum: compare before and after a refusal."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if name in ("lock", "last-error", "store.lock"):
                continue
            found[os.path.relpath(path, root)] = file_digest(path)
    return found
