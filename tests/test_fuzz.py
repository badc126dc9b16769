"""Hostile input, fuzzed with hypothesis: snapshot names, descriptions, XML, control words
(through the core and through a mount, any bytes at any offset).

Every example must end in a clean SnapfsError (or OSError with a clean errno through the
mount) that leaves the store byte for byte as it was (tests/helpers.tree_fingerprint),
or in a correct result. Never another exception, never a traceback.
"""

from __future__ import annotations

import errno
import os
import re

import pytest
import trio
from helpers import make_image, tree_fingerprint, write_pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs import CONTROL_WORDS, SnapfsError
from snapfs.catalog import StoreCore
from snapfs.rules import MAX_DESCRIPTION_BYTES

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
DOM = "vm1"

ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())  # surrogates too
ANY_TEXT = st.text(ANY_CHAR, max_size=300)
HOSTILE_NAMES = st.one_of(
    ANY_TEXT,
    st.sampled_from(["", ".", "..", ".hidden", "a/b", "/", "a\0b", "\udcff", "x" * 256, "é" * 128]),
    st.text(ANY_CHAR, min_size=200, max_size=2000),
    st.builds(lambda a, b: a + "/" + b, ANY_TEXT, ANY_TEXT),
)


class World:
    def __init__(self, directory: str) -> None:
        images = os.path.join(directory, "images")
        os.makedirs(images)
        vda = make_image(os.path.join(images, "vda.qcow2"), "qcow2")
        vdb = make_image(os.path.join(images, "vdb.img"), "raw")
        write_pattern(vda, 0xA1, 0)
        write_pattern(vdb, 0xB1, 0, fmt="raw")
        self.root = os.path.join(directory, "store")
        self.store = StoreCore(self.root)
        trio.run(self.store.define, DOM, [("vda", vda, "qcow2"), ("vdb", vdb, "raw")])
        self.dom = self.store.domain(DOM)
        self.base = trio.run(self.dom.create, "base", "a description")

    def fingerprint(self) -> dict[str, str]:
        return tree_fingerprint(self.root)

    def refused_cleanly(self, call, *args) -> SnapfsError | None:
        """Run a core call; on SnapfsError check the store did not change."""
        before = self.fingerprint()
        try:
            trio.run(call, *args)
        except SnapfsError as exc:
            assert isinstance(exc.errno, int) and exc.message.strip(), exc
            assert self.fingerprint() == before, f"a refusal changed the store: {exc}"
            return exc
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(str(tmp_path_factory.mktemp("fuzz")))


# What an XML 1.0 document cannot carry (names and descriptions go into XML): written
# here from the XML spec, independently of snapfs.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def valid_name(name: str) -> bool:
    """DESIGN: 1-255 bytes of UTF-8, no '/', no NUL, not starting with '.'; and XML-safe."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 0 < size <= 255 and "/" not in name and not name.startswith(".") and not NOT_XML.search(name)


@FUZZ
@given(name=HOSTILE_NAMES)
def test_snapshot_names(world, name):
    exc = world.refused_cleanly(world.dom.create, name)
    if exc is None:
        assert valid_name(name)
        record = world.dom.lookup(name)
        trio.run(world.dom.merge, record.id)
    else:
        assert not valid_name(name) or world.dom.view().by_name(name) is not None, exc


@FUZZ
@given(name=HOSTILE_NAMES)
def test_rename_to_any_name(world, name):
    exc = world.refused_cleanly(world.dom.rename, world.base.id, name)
    if exc is None:
        assert valid_name(name) and world.dom.get(world.base.id).name == name
        trio.run(world.dom.rename, world.base.id, "base")
    else:
        assert not valid_name(name), exc


@FUZZ
@given(text=st.one_of(ANY_TEXT, st.text(ANY_CHAR, min_size=5000, max_size=8000).map(lambda t: t * 3)))
def test_descriptions(world, text):
    exc = world.refused_cleanly(world.dom.set_description, world.base.id, text)
    fits = not NOT_XML.search(text) and len(text.encode("utf-8")) <= MAX_DESCRIPTION_BYTES
    if exc is None:
        assert fits and world.dom.get(world.base.id).description == text
    else:
        assert not fits and exc.errno in (errno.EINVAL, errno.EFBIG), exc


BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
    + "]><domainsnapshot><name>&lol9;</name></domainsnapshot>"
)
HOSTILE_XML = [
    BOMB,
    '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domainsnapshot><name>&x;</name></domainsnapshot>',
    '<!DOCTYPE d [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]><domainsnapshot><name>&x;</name></domainsnapshot>',
    '<!DOCTYPE d SYSTEM "file:///etc/passwd"><domainsnapshot/>',
    '<?xml version="1.0"?><!doctype d><domainsnapshot/>',
    '<domainsnapshot xmlns:xi="http://www.w3.org/2001/XInclude"><name><xi:include href="/etc/passwd" '
    'parse="text"/></name></domainsnapshot>',
    "<domainsnapshot><name>&amp;</name>" + "<a>" * 5000 + "</a>" * 5000 + "</domainsnapshot>",
    "<domainsnapshot><description>" + "x" * (2 << 20) + "</description></domainsnapshot>",
    "<domainsnapshot><name>n</name><compression>lz4</compression></domainsnapshot>",
    "<domainsnapshot><name>.dot</name></domainsnapshot>",
    "<domain><name>x</name></domain>",
    "",
    "<",
    "\xff\xfe",
]


def xml_documents():
    tags = st.sampled_from(["name", "description", "compression", "parent", "disks", "x"])
    element = st.builds(lambda t, body: f"<{t}>{body}</{t}>", tags, ANY_TEXT)
    return st.one_of(
        st.sampled_from(HOSTILE_XML),
        st.binary(max_size=2000),
        ANY_TEXT,
        st.builds(lambda parts: "<domainsnapshot>" + "".join(parts) + "</domainsnapshot>", st.lists(element)),
    )


@FUZZ
@given(doc=xml_documents())
def test_snapshot_xml(world, doc):
    names_before = {r.name for r in world.dom.view().snapshots.values()}
    exc = world.refused_cleanly(world.dom.create_from_xml, doc)
    if exc is None:
        new = [r for r in world.dom.view().snapshots.values() if r.name not in names_before]
        assert len(new) == 1, "a create that succeeded made no snapshot"
        assert "root:" not in new[0].name and "root:" not in new[0].description, "an external entity was read"
        trio.run(world.dom.merge, new[0].id)
    else:
        assert exc.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.EEXIST, errno.EFBIG), exc


@pytest.mark.parametrize("call", ["define_xml", "create_from_xml"])
def test_xml_text_with_a_surrogate(world, call):
    target = world.store if call == "define_xml" else world.dom
    assert world.refused_cleanly(getattr(target, call), "<domainsnapshot><name>\ud800</name></domainsnapshot>")


@FUZZ
@given(doc=st.one_of(st.sampled_from([x.replace("domainsnapshot", "domain") for x in HOSTILE_XML]), xml_documents()))
def test_domain_xml(world, doc):
    before = world.store.domain_names()
    exc = world.refused_cleanly(world.store.define_xml, doc)
    assert exc is not None, "hostile domain XML defined a domain"
    assert world.store.domain_names() == before


@FUZZ
@given(
    word=st.one_of(ANY_TEXT, st.text(ANY_CHAR, min_size=1000, max_size=100000)).filter(lambda w: w not in CONTROL_WORDS)
)
def test_control_words(world, word):
    exc = world.refused_cleanly(world.dom.control, world.base.id, word)
    assert exc is not None and exc.errno == errno.EINVAL, exc


# ---- through a mount --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mounted(world, tmp_path_factory):
    from fsfixtures import Mount

    mount = Mount(world.root, str(tmp_path_factory.mktemp("fuzzmnt") / "mnt"))
    mount.start()
    yield mount
    assert mount.stop() == 0, mount.log()


def _valid_control_write(data: bytes) -> bool:
    try:
        return data.decode("utf-8").strip() in CONTROL_WORDS
    except UnicodeDecodeError:
        return False


@pytest.mark.timeout(300)
@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(min_size=4000, max_size=200000),
        ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    ).filter(lambda d: not _valid_control_write(d)),
    offset=st.one_of(st.just(0), st.integers(0, 1 << 40)),
)
def test_control_writes_through_the_mount(world, mounted, data, offset):
    control = os.path.join(mounted.path, DOM, "snapshots", "base", "control")
    before = world.fingerprint()
    fd = os.open(control, os.O_WRONLY)
    try:
        written = os.pwrite(fd, data, offset)
        assert data == b"" and written == 0, f"the mount accepted {data[:40]!r}"
    except OSError as exc:
        assert exc.errno in (errno.EINVAL, errno.EFBIG), exc
    finally:
        os.close(fd)
    assert world.fingerprint() == before
    assert os.listdir(os.path.join(mounted.path, DOM, "snapshots")) == ["base"]  # the mount is alive
