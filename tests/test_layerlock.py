"""Issue 12: layers held the way QEMU holds them (layerlock.hold), chains checked before
qemu-img opens them (layerlock.check_chain), and the modes of new layers. Real images,
real qemu-io and qemu-img; the whole-operation behaviour is test_containment's writer loop."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time

import pytest
from failfixtures import (  # noqa: F401  (fixtures are used by name)
    as_nobody,
    fstore_fixture,
    new_store,
    ok,
    public_dir_fixture,
    refused,
)
from helpers import make_image, write_pattern

from snapfs import layerlock
from snapfs.errors import SnapfsError

pytestmark = pytest.mark.timeout(60)
BACKUP_GID = 4242  # a backup group (no name needed)


def qemu_io_write(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 4k", path], capture_output=True, text=True)


def overlay(path: str, backing: str, fmt: str = "qcow2") -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, "4M"], check=True)
    return path


def test_a_held_layer_refuses_writers_and_readers_until_released(tmp_path):
    layer = make_image(str(tmp_path / "live.qcow2"), "qcow2")
    with layerlock.hold({layer: "write"}):
        run = qemu_io_write(layer)
        assert run.returncode != 0 and '"write" lock' in run.stderr, run.stderr
        info = subprocess.run(["qemu-img", "info", layer], capture_output=True, text=True)
        assert info.returncode != 0 and "lock" in info.stderr
        fd = os.open(layer, os.O_RDONLY)
        try:
            with pytest.raises(SnapfsError) as caught:
                layerlock.hold_read_locks(fd, layer)  # the mount's reader
            assert caught.value.errno == errno.EBUSY
        finally:
            os.close(fd)
        # snapfs's own qemu-img, with locking off, still works on it
        opts = f"driver=qcow2,file.driver=file,file.filename={layer},file.locking=off"
        subprocess.run(["qemu-img", "check", "-q", "--image-opts", opts], check=True)
    assert qemu_io_write(layer).returncode == 0


def test_a_layer_being_deleted_refuses_writers_not_readers(tmp_path):
    layer = make_image(str(tmp_path / "s.qcow2"), "qcow2")
    with layerlock.hold({layer: "read"}):
        assert qemu_io_write(layer).returncode != 0
        assert subprocess.run(["qemu-img", "info", layer], capture_output=True).returncode == 0


def test_hold_refuses_a_layer_another_process_writes(tmp_path):
    layer = make_image(str(tmp_path / "live.qcow2"), "qcow2")
    writer = subprocess.Popen(["qemu-io", "-f", "qcow2", layer], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while layerlock.in_use([layer]) is None:
            assert time.monotonic() < deadline, "qemu-io never took its locks"
            time.sleep(0.02)
        with pytest.raises(SnapfsError) as caught:
            layerlock.hold({layer: "write"})
        assert caught.value.errno == errno.EBUSY and "in use" in caught.value.message
    finally:
        writer.communicate(b"quit\n", timeout=10)
    layerlock.hold({layer: "write"}).close()


def test_check_chain_refuses_what_is_not_a_layer(tmp_path):
    base = make_image(str(tmp_path / "base.qcow2"), "qcow2")
    layers = tmp_path / "layers"
    layers.mkdir()
    s1 = overlay(str(layers / "s1.qcow2"), base)
    live = overlay(str(layers / "live.qcow2"), "s1.qcow2")
    assert layerlock.check_chain(live, {base}) == [(live, "qcow2"), (s1, "qcow2"), (base, "qcow2")]

    def refusal(*args) -> SnapfsError:
        started = time.monotonic()
        with pytest.raises(SnapfsError) as caught:
            layerlock.check_chain(*args)
        assert time.monotonic() - started < 2
        return caught.value

    os.rename(s1, s1 + ".away")
    os.mkfifo(s1)
    assert refusal(live, {base}).errno == errno.EINVAL and "FIFO" in refusal(live, {base}).message
    os.unlink(s1)
    os.symlink(s1 + ".away", s1)
    assert refusal(live, {base}).errno == errno.ELOOP
    os.unlink(s1)
    os.rename(s1 + ".away", s1 + ".real")
    os.symlink("s1.qcow2.real", s1)  # to a file beside it (a live layer's stable path, DESIGN section 8)
    assert [path for path, _ in layerlock.check_chain(live, {base})] == [live, s1, base]
    os.unlink(s1)
    os.rename(s1 + ".real", s1)
    other = make_image(str(tmp_path / "other.qcow2"), "qcow2")
    outside = overlay(str(layers / "x.qcow2"), other)
    assert "not the domain's base" in refusal(outside, {base}).message
    escaping = overlay(str(layers / "y.qcow2"), "../base.qcow2")
    assert "not a layer beside it" in refusal(escaping, {base}).message
    hostile = overlay(str(layers / "z.qcow2"), 'json:{"driver":"raw","file":{"filename":"/etc/shadow"}}', "raw")
    assert "json:" in refusal(hostile, {base}).message
    chained_base = overlay(str(tmp_path / "chained.qcow2"), base)
    on_chained = overlay(str(layers / "w.qcow2"), chained_base)
    assert "its own backing file" in refusal(on_chained, {chained_base}).message


def test_define_refuses_a_base_with_an_external_data_file(public_dir):
    store = new_store(public_dir)
    secret = os.path.join(public_dir, "secret")
    with open(secret, "wb") as f:
        f.write(b"S" * (1 << 20))
    image = os.path.join(public_dir, "evil.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", image, "1M"],
        check=True,
    )
    refused(store.root, "define", "--name", "evil", "--disk", f"vda={image},format=qcow2", words=("data file",))
    assert not os.path.exists(os.path.join(store.root, "domains", "evil"))


def test_a_store_opened_to_a_group_makes_its_new_layers_readable_by_it(public_dir):
    store = new_store(public_dir)
    store.add_domain("vm1")
    live = store.live("vm1")
    assert stat.S_IMODE(os.stat(live).st_mode) == 0o600
    os.chown(store.root, -1, BACKUP_GID)
    os.chmod(store.root, 0o750)
    layer = store.snap("vm1", "s1")
    write_pattern(live, 0x33, 0)
    for path in (layer, store.live("vm1")):  # both moved into place since the store was opened
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, BACKUP_GID), path
    ok(store.root, "snapshot-create-as", "vm1", "s2")
    assert as_nobody("head", "-c", "1", store.live("vm1")).returncode != 0  # not in the group
    member = ["setpriv", "--reuid", "nobody", "--regid", str(BACKUP_GID), "--clear-groups", "head", "-c", "1"]
    assert subprocess.run([*member, store.live("vm1")], capture_output=True).returncode == 0
