"""Test helpers: real images, byte patterns written and checked with qemu-io."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

MiB = 1 << 20
DISK_SIZE = 4 * MiB
CLUSTER = 64 * 1024

# The ways in: the interpreter (python -m snapfs.mount), the repository and the snapfs command.
PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPFS = os.path.join(os.path.dirname(sys.executable), "snapfs")


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
    if "Pattern verification failed" in run.stdout:
        return False
    assert run.returncode == 0 and "error" not in run.stdout.lower(), run.stdout + run.stderr
    return True


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
    """Every file under root with its checksum: compare before and after a refusal.
    Locks, last-error, run/ (the registrations of running mounts) and staged/ (the next live
    layers made ahead, by a thread after the last change: snapfs/prestage.py) are not data."""
    found = {}
    for dirpath, _, names in os.walk(root):
        if os.path.relpath(dirpath, root).split(os.sep)[0] == "run" or os.path.basename(dirpath) == "staged":
            continue
        for name in names:
            path = os.path.join(dirpath, name)
            if name in ("lock", "last-error", "store.lock"):
                continue
            found[os.path.relpath(path, root)] = file_digest(path)
    return found


# ---- added for the core suite (tests/test_core.py, test_walk.py, test_api_errors.py) ----


def image_info(path: str) -> dict:
    """`qemu-img info` of one image, without taking qemu's lock (-U)."""
    run = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def backing_filename(path: str) -> str | None:
    """The backing link exactly as written in the qcow2 header."""
    return image_info(path).get("backing-filename")


def write_zeros(path: str, offset: int, length: int = CLUSTER, fmt: str = "qcow2") -> None:
    """Write zeros (a qcow2 zero cluster where aligned): must hide whatever lies below."""
    run = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -z {offset} {length}", path], capture_output=True, text=True
    )
    assert run.returncode == 0 and "error" not in run.stdout.lower(), run.stdout + run.stderr


def apply_writes(data: bytes, writes: dict[int, int]) -> bytes:
    """data with {offset: pattern} cluster writes applied (pattern 0 = zeros)."""
    out = bytearray(data)
    for offset, pattern in writes.items():
        out[offset : offset + CLUSTER] = bytes([pattern]) * CLUSTER
    return bytes(out)


def layout_problems(domain) -> list[str]:
    """What is wrong with a domain's layer files against its metadata (empty when right),
    read through the public API (live_paths, live_layer_paths, base_paths, layer_paths,
    get_parent).

    Per disk: layers/<target>/ holds exactly live.qcow2 (a relative symlink to the live
    layer's real file beside it), that real file, and one real file per snapshot, no two
    of them alike; each snapshot layer's backing link is its parent's layer basename (or
    the base image's absolute path for a root); the live layer sits on current's layer
    (or the base)."""
    snaps = [domain.snapshot_lookup_by_name(name) for name in domain.list_snapshot_names()]
    current = domain.current_snapshot()
    problems = []
    for target, live in domain.live_paths().items():
        directory = os.path.dirname(live)
        real = domain.live_layer_paths()[target]
        if os.path.basename(live) != "live.qcow2" or os.readlink(live) != os.path.basename(real):
            problems.append(f"{target}: {live} is not a symlink to {os.path.basename(real)}")
        names = [os.path.basename(real)] + [os.path.basename(snap.layer_paths()[target]) for snap in snaps]
        if len(set(names)) != len(names) or any(os.path.dirname(s.layer_paths()[target]) != directory for s in snaps):
            problems.append(f"{target}: layer names are not distinct files of one directory: {names}")
        want = {"live.qcow2", *names}
        have = set(os.listdir(directory))
        if have != want:
            problems.append(f"{target}: orphan {sorted(have - want)} missing {sorted(want - have)}")
            continue
        base = domain.base_paths()[target]

        def link(on, base=base, target=target) -> str:
            return base if on is None else os.path.basename(on.layer_paths()[target])

        for snap in snaps:
            got = backing_filename(snap.layer_paths()[target])
            if got != link(snap.get_parent()):
                problems.append(f"{target}: layer of {snap.name!r} backs on {got}, want {link(snap.get_parent())}")
        got = backing_filename(real)
        if got != link(current):
            problems.append(f"{target}: live layer backs on {got}, want {link(current)}")
    return problems


# ---- added for the proof matrix (tests/test_crash.py, test_concurrency.py, test_fuzz.py) ----

DOMAIN_DIR_ENTRIES = {"domain.json", "domain.xml", "state.json", "snapshots", "layers", "lock", "last-error", "staged"}


def qemu_check_problems(path: str) -> list[str]:
    """`qemu-img check` of one layer (no repair, no lock taken) and its dirty flag."""
    args = ["qemu-img", "check", "-U", "-f", "qcow2", "--output=json", path]
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        return [f"qemu-img check {path}: status {run.returncode}: {run.stdout.strip()} {run.stderr.strip()}"]
    info = image_info(path)
    if info.get("dirty-flag") or info.get("format-specific", {}).get("data", {}).get("corrupt"):
        return [f"{path}: dirty or corrupt: {info}"]
    return []


def store_integrity_problems(store_root: str, domain_name: str) -> list[str]:
    """What is wrong with a domain on disk, whatever its content should be: a journal left
    behind, stray files (temporaries) in the domain or snapshots directory, layer files
    against the metadata (orphans, missing, backing links: helpers.layout_problems), and
    `qemu-img check` of every layer. Empty when right."""
    import snapfs

    problems = []
    path = os.path.join(store_root, "domains", domain_name)
    stray = set(os.listdir(path)) - DOMAIN_DIR_ENTRIES
    if stray:
        problems.append(f"unexpected files in the domain directory: {sorted(stray)}")
    domain = snapfs.Store(snapfs.api.open_store_core(store_root)).lookup_domain(domain_name)  # no recovery
    metas = set(os.listdir(os.path.join(path, "snapshots")))
    want = {f"{domain.snapshot_lookup_by_name(name).id}.json" for name in domain.list_snapshot_names()}
    if metas != want:
        problems.append(f"snapshot metadata files: extra {sorted(metas - want)} missing {sorted(want - metas)}")
    problems += layout_problems(domain)
    for live in domain.live_paths().values():
        directory = os.path.dirname(live)
        for name in sorted(os.listdir(directory)):
            problems += qemu_check_problems(os.path.join(directory, name))
    return problems
