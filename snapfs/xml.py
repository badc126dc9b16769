"""Domain XML and domainsnapshot XML, in and out, with lxml and a parser that trusts nothing.

The parser never resolves entities, never reads the network, caps input size, and refuses
any document carrying a DOCTYPE (the door for entity bombs and external entities).
"""

from __future__ import annotations

import datetime
import re
import uuid as uuidlib
from dataclasses import dataclass, field

from lxml import etree

from .errors import invalid

MAX_XML_BYTES = 1 << 20
_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse(text: str | bytes, what: str) -> etree._Element:
    try:
        data = text.encode() if isinstance(text, str) else bytes(text)
    except UnicodeEncodeError:
        raise invalid(f"The {what} is not valid Unicode text.") from None
    if len(data) > MAX_XML_BYTES:
        raise invalid(f"The {what} is larger than {MAX_XML_BYTES} bytes.")
    if _DOCTYPE.search(data):
        raise invalid(f"The {what} has a DOCTYPE or entity declaration, which snapfs refuses.")
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=True
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise invalid(f"The {what} is not well-formed XML: {exc}.") from exc
    if root is None:
        raise invalid(f"The {what} is empty.")
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise invalid(f"The {what} has an entity reference, which snapfs refuses.")
    return root


@dataclass
class SnapshotRequest:
    name: str | None = None
    description: str | None = None
    compression: str | None = None
    disk_only: bool = False  # <memory snapshot='no'/>: the disks only, even of a running domain


def parse_snapshot_request(text: str | bytes) -> SnapshotRequest:
    """Read only name, description, compression and whether memory is left out
    (`<memory snapshot='no'/>`); ignore the rest (the seed's rule)."""
    root = parse(text, "snapshot XML")
    if root.tag != "domainsnapshot":
        raise invalid(f"The snapshot XML's root element is <{root.tag}>, not <domainsnapshot>.")
    request = SnapshotRequest()
    for tag in ("name", "description", "compression"):
        node = root.find(tag)
        if node is not None:
            setattr(request, tag, (node.text or "").strip() if tag != "description" else node.text or "")
    if request.compression == "":
        request.compression = None
    memory = root.find("memory")
    request.disk_only = memory is not None and memory.get("snapshot") == "no"
    return request


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    node = etree.SubElement(parent, tag, **attrs)
    if text is not None:
        node.text = text
    return node


def iso_utc(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot_xml(
    *,
    name: str,
    description: str,
    state: str,
    creation_time: int,
    parent_name: str | None,
    domain: str,
    compression: str,
    disks: list[tuple[str, str]],
    memory: str | None = None,
) -> str:
    """`memory`: the saved memory's file (a snapshot with memory); a running domain's
    disk-only snapshot says <memory snapshot='no'/>."""
    root = etree.Element("domainsnapshot")
    _sub(root, "name", name)
    if description:
        _sub(root, "description", description)
    _sub(root, "state", state)
    _sub(root, "creationTime", str(creation_time))
    _sub(root, "creationdate", iso_utc(creation_time))
    if parent_name is not None:
        _sub(_sub(root, "parent"), "name", parent_name)
    # The whole domain definition (name and uuid first), as libvirt embeds it: its
    # snapshot-create --redefine refuses a <domain> that is not a full definition.
    root.append(parse(domain, "stored domain XML"))
    _sub(root, "compression", compression)
    if memory is not None:
        _sub(root, "memory", snapshot="external", file=memory)
    elif state == "disk-snapshot":
        _sub(root, "memory", snapshot="no")
    disks_node = _sub(root, "disks")
    for target, layer in disks:
        disk = _sub(disks_node, "disk", name=target, snapshot="external", type="file")
        _sub(disk, "driver", type="qcow2")
        _sub(disk, "source", file=layer)
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n"


@dataclass
class DiskDef:
    target: str
    path: str
    format: str | None


@dataclass
class DomainDef:
    name: str
    uuid: str
    disks: list[DiskDef]
    skipped: list[str] = field(default_factory=list)


def parse_domain_xml(text: str | bytes) -> tuple[DomainDef, str]:
    """A libvirt domain definition (`virsh dumpxml` output). Returns the definition and
    the XML text to keep. Disks that cannot be snapshotted here are listed in `skipped`."""
    root = parse(text, "domain XML")
    if root.tag != "domain":
        raise invalid(f"The domain XML's root element is <{root.tag}>, not <domain>.")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise invalid("The domain XML has no <name>.")
    uuid = (root.findtext("uuid") or "").strip()
    if not uuid:
        uuid = str(uuidlib.uuid4())
        root.find("name").addnext(etree.Element("uuid"))
        root.find("uuid").text = uuid
    disks: list[DiskDef] = []
    skipped: list[str] = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        label = dev or "(no target)"
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        if disk.get("device", "disk") != "disk":
            skipped.append(f"{label}: a {disk.get('device')} is not snapshotted")
        elif disk.get("snapshot") == "no":
            skipped.append(f"{label}: snapshot='no' in the domain XML")
        elif disk.get("type", "file") != "file" or not path:
            skipped.append(f"{label}: only file-backed disks are snapshotted")
        elif not dev:
            skipped.append(f"{path}: the disk has no <target dev>")
        else:
            driver = disk.find("driver")
            fmt = driver.get("type") if driver is not None else None
            disks.append(DiskDef(dev, path, fmt))
    etree.indent(root, space="  ")
    return DomainDef(name, uuid, disks, skipped), etree.tostring(root, encoding="unicode")


def minimal_domain_xml(name: str, uuid: str, disks: list[DiskDef]) -> str:
    root = etree.Element("domain", type="kvm")
    _sub(root, "name", name)
    _sub(root, "uuid", uuid)
    devices = _sub(root, "devices")
    for disk in disks:
        node = _sub(devices, "disk", type="file", device="disk")
        _sub(node, "driver", name="qemu", type=disk.format or "raw")
        _sub(node, "source", file=disk.path)
        _sub(node, "target", dev=disk.target, bus="virtio")
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode")


def domain_xml_on_layers(original: str, layers: dict[str, str]) -> str:
    """The domain XML with each snapshotted disk pointing at a qcow2 layer (the live
    layers for dumpxml; a snapshot's layers inside its snapshot XML)."""
    root = parse(original, "stored domain XML")
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in layers:
            continue
        driver = disk.find("driver")
        if driver is None:
            driver = etree.Element("driver", name="qemu")
            disk.insert(0, driver)
        driver.set("type", "qcow2")
        source = disk.find("source")
        if source is None:
            source = _sub(disk, "source")
        source.set("file", layers[dev])
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n"
