#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/.

Seeds are valid encodings (plus a few near misses) of each format, laid out as the Rust
encoders write them (see the comment at each one); libFuzzer mutates from there. Rerun after a
format change and commit the output:  python3 fuzz/gen_corpus.py
"""
import hashlib
import json
import os
import shutil
import struct
import uuid as uuidlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
UUID_A = uuidlib.UUID("11111111-2222-4333-8444-555555555555").bytes
UUID_B = uuidlib.UUID("66666666-7777-4888-9999-aaaaaaaaaaaa").bytes


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", crc32c(body))


def write(target: str, seeds: list) -> None:
    d = os.path.join(ROOT, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for s in seeds:
        name = hashlib.sha1(s).hexdigest()
        with open(os.path.join(d, name), "wb") as f:
            f.write(s)


# --- xseg payloads (xseg/src/protocol.rs, peers/src/wire.rs): little endian, names u16+bytes
def name(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<H", len(b)) + b


def opt(s):
    return b"\x00" if s is None else b"\x01" + name(s)


def map_reply(extents):
    out = struct.pack("<I", len(extents))
    for obj, off, ln, flags in extents:
        out += struct.pack("<QQI", off, ln, flags) + name(obj)
    return out


def volume_info(n="vol-1", kind=0, parent=None):
    return (struct.pack("<Q", 1 << 30) + name(n) + bytes([kind]) + UUID_A
            + struct.pack("<IQ", 4 << 20, 3) + opt(parent) + struct.pack("<Q", 1700000000))


def xseg_payload():
    s = []
    s.append(bytes([0]) + map_reply([]))
    s.append(bytes([0]) + map_reply([("ob.x.1.0", 0, 4096, 0), ("", 4096, 8192, 1),
                                     ("ct." + "ab" * 32, 0, 1 << 22, 2)]))
    s.append(bytes([1]) + name("snap-1") + struct.pack("<Q", 1 << 30))
    s.append(bytes([2]) + volume_info())
    s.append(bytes([2]) + volume_info("s", 1, "vol-1"))
    s.append(bytes([3]) + struct.pack("<QII", 1 << 30, 4 << 20, 4096))
    s.append(bytes([4]) + struct.pack("<H", 2) + name("a") + name("a-s") + name("b") + name("b-s"))
    s.append(bytes([5]) + struct.pack("<II", 3, 2) + volume_info() + volume_info("w", 1, "v"))
    s.append(bytes([6]) + struct.pack("<Q", 7) + map_reply([("ob.y.2.1", 0, 512, 1)]))
    s.append(bytes([7]) + struct.pack("<Q", 4096) + b"\x01" + struct.pack("<Q", 99))
    s.append(bytes([8]) + opt("node-a") + struct.pack("<Q", 5))
    s.append(bytes([8]) + opt(None) + struct.pack("<Q", 0))
    s.append(bytes([9]) + struct.pack("<QQQ", 100, 1 << 20, 3))
    s.append(bytes([10]) + struct.pack("<Q", 600) + b"\x01")
    s.append(bytes([11]) + opt("node-b") + name("volume is locked"))
    s.append(bytes([12]) + struct.pack("<7Q", *range(1, 8)))
    s.append(bytes([13]) + struct.pack("<5Q", *range(1, 6)))
    s.append(bytes([14]) + name("abc") + struct.pack("<QIH", 1, 2, 3))
    s.append(bytes([15]) + struct.pack("<5Q", *range(5)))
    write("xseg_payload", s)


# --- xseg segment header (xseg/src/layout.rs Header): fuzzed over a valid image, so seeds
# are the valid header itself (taken from the image at run time) plus a few variants.
def xseg_header(nr_ports=4, dyn=2, nr_req=8, classes=((4096, 4), (8192, 2)), size=0):
    cs = [c[0] for c in classes] + [0] * (8 - len(classes))
    cc = [c[1] for c in classes] + [0] * (8 - len(classes))
    h = struct.pack("<QIIQIIII", int.from_bytes(b"ARCHXSEG", "little"), 1, 4096, size,
                    nr_ports, dyn, nr_req, len(classes))
    h += struct.pack("<8Q", *cs) + struct.pack("<8I", *cc)
    h += struct.pack("<IIII", 1024, 512, 1, 0)
    return h


def xseg_segment():
    # segment_size 0 is refused; the fuzzer finds the right one from the comparison.
    write("xseg_segment", [xseg_header(), xseg_header(nr_ports=1, dyn=1),
                           xseg_header(nr_req=1, classes=((4096, 1),)), b"ARCHXSEG"])


def xseg_requests():
    seeds = [bytes([3])]
    # A few writes: request slot words (state, holder, target_len, buffer, data_len ...).
    for sel in (1, 3, 0x84):
        w = b""
        for off, val in ((0x4000, 2), (0x4008, 0xFFFFFFFF), (0x4050, 300), (0x4058, 9),
                         (0x2000, 1 << 40), (0x3008, 7)):
            w += struct.pack("<IQ", off, val)
        seeds.append(bytes([sel]) + w)
    write("xseg_requests", seeds)


# --- NBD (node/src/nbd/proto.rs): big endian
NBD_OPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def nbd_option(option, data=b""):
    return struct.pack(">QII", NBD_OPT, option, len(data)) + data


def info_req(export, reqs=()):
    e = export.encode()
    return struct.pack(">I", len(e)) + e + struct.pack(">H", len(reqs)) + b"".join(
        struct.pack(">H", r) for r in reqs)


def nbd_req(kind, offset, length, flags=0, handle=1, data=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, kind, handle, offset, length) + data


def nbd_proto():
    limits = struct.pack("<QI", 4 << 20, 1 << 20)
    s = [b"vol-1", info_req("vol-1", (0, 1, 2, 3)), info_req("", ())]
    for kind, off, ln, fl in ((0, 0, 4096, 0), (1, 4096, 512, 1), (2, 0, 0, 0), (3, 0, 0, 0),
                              (4, 0, 1 << 20, 0), (6, 0, 8192, 3), (9, 0, 1, 0)):
        s.append(nbd_req(kind, off, ln, fl) + limits + bytes([0]))
    s.append(nbd_req(1, 0, 512) + limits + bytes([2]))
    write("nbd_proto", s)


def nbd_session():
    flags = struct.pack(">I", 3)
    go = nbd_option(7, info_req("v", (1, 2, 3)))
    s = [
        flags + nbd_option(3) + nbd_option(2),
        flags + nbd_option(6, info_req("v", (0,))) + nbd_option(8) + nbd_option(5) + nbd_option(2),
        flags + nbd_option(6, info_req("nope")) + nbd_option(2),
        flags + go + nbd_req(0, 0, 4096) + nbd_req(2, 0, 0),
        flags + go + nbd_req(1, 4096, 16, 1, 2, b"x" * 16) + nbd_req(3, 0, 0)
        + nbd_req(0, 4096, 16, 0, 3) + nbd_req(4, 0, 4096, 0, 4) + nbd_req(6, 8192, 4096, 2, 5)
        + nbd_req(2, 0, 0),
        flags + go + nbd_req(0, 4 << 20, 1, 0, 7) + nbd_req(9, 0, 0, 0, 8),
        struct.pack(">I", 1) + nbd_option(1, b"v") + nbd_req(0, 0, 512) + nbd_req(2, 0, 0),
    ]
    write("nbd_session", s)


# --- control protocol (src/control/protocol.rs): JSON lines
def control_protocol():
    lines = [
        {"v": 1, "op": "status"},
        {"v": 1, "op": "volume_create", "name": "db", "size": 1073741824, "block_size": None},
        {"v": 1, "op": "volume_list"},
        {"v": 1, "op": "volume_info", "name": "db"},
        {"v": 2, "op": "volume_info", "name": "db"},
        {"op": "volume_info", "name": "db"},
        {"type": "data", "offset": 0, "len": 4194304},
        {"type": "zero", "offset": 4194304, "len": 4194304},
        {"type": "end"},
        {"type": "ok", "value": {"name": "db", "kind": "volume"}},
        {"type": "error", "kind": "not_found", "message": "volume nope not found"},
        {"type": "error", "kind": "locked", "message": "held", "holder": "node-a"},
    ]
    write("control_protocol", [json.dumps(l).encode() for l in lines])


# --- map header and page (peers/src/map_format/header.rs, page.rs): little endian + CRC-32C
def map_header(name_s="vol-1", read_only=False, inherited=()):
    n = name_s.encode()
    flags = 1 if read_only else 0
    origins = [UUID_A] if not read_only else [UUID_B, UUID_A]
    self_origin = 0xFFFF if read_only else 0
    body = b"ARCHMAP1" + struct.pack("<HHI", 2, flags, 0) + UUID_A
    body += struct.pack("<QIIQQQ", 64 << 20, 4 << 20, 16, 3, 1700000000, 2)
    body += struct.pack("<HHHH", self_origin, len(origins), len(n), 0) + n
    body += b"".join(origins)
    body += struct.pack("<I", len(inherited))
    for p, owner in inherited:
        body += struct.pack("<I", p) + owner
    return with_crc(body)


def map_page(page=0, entries=16, contents=()):
    body = b"ARCHPG01" + struct.pack("<HHI", 1, 0, page) + UUID_A
    body += struct.pack("<II", entries, len(contents))
    raw = []
    for i in range(entries):
        if i < len(contents):
            raw.append(2 | i << 2)
        elif i % 3 == 1:
            raw.append(1 | 0 << 2 | 3 << 18)
        else:
            raw.append(0)
    body += b"".join(struct.pack("<Q", r) for r in raw)
    body += b"".join(contents)
    return with_crc(body)


def maps():
    write("map_header", [map_header(), map_header(inherited=((1, UUID_B), (3, UUID_B))),
                         map_header("snap", True), b"vol.vol-1", b"pg." + str(uuidlib.UUID(bytes=UUID_A)).encode() + b".3",
                         b"ob." + str(uuidlib.UUID(bytes=UUID_A)).encode() + b".3.17", b"ct." + b"ab" * 32])
    # First byte: page size 16 << (b % 13), 0x80 recomputes the checksum.
    write("map_page", [bytes([0]) + map_page(), bytes([0]) + map_page(5, 16, (b"\x01" * 32, b"\x02" * 32)),
                       bytes([0x81]) + map_page(0, 32)])


# --- lock objects: file blocker (binary + CRC) and RADOS blocker (text)
def file_lock(holder: str, generation: int) -> bytes:
    h = holder.encode()
    return with_crc(b"ARCHLK01" + struct.pack("<QH", generation, len(h)) + h)


def lock_object():
    write("lock_object", [
        bytes([0]) + file_lock("node-a", 3), bytes([0]) + file_lock("", 0),
        bytes([1]) + file_lock("node-b/2", 9),
        bytes([2]) + b"archip-lock v1\ngeneration=4\nholder=node-a\naddress=10.0.0.1:0/123\n",
        bytes([2]) + b"archip-lock v1\ngeneration=0\nholder=\naddress=\n",
    ])


# --- node device state and CSI records: JSON documents
def json_docs():
    rec = {"dev_id": 0, "volume": "vol-1", "segment": "archip", "pid": 1234, "pid_start": 5678,
           "queues": 2, "depth": 128, "logical_block_size": 512, "user_copy": False,
           "size": 1073741824, "shared": False}
    docs = [{"version": 1, "devices": []}, {"version": 1, "devices": [rec, dict(rec, dev_id=7)]},
            {"version": 2, "devices": []}]
    seeds = [json.dumps(d, indent=2).encode() for d in docs] + [b"", b"/dev/ublkb12", b"ublkb3"]
    write("device_state", seeds)
    vol = {"version": 1, "name": "pvc-1", "parameters": {"blockSize": "4Mi"},
           "mutable_parameters": {}, "source": {"Snapshot": "snap-1"}, "node": None,
           "publications": [{"node_id": "n1", "mode": 1, "block": False, "readonly": False}]}
    snap = {"version": 1, "name": "snap-1", "source_volume_id": "vol-1", "group_id": None}
    group = {"version": 1, "name": "g", "source_volume_ids": ["a", "b"],
             "snapshot_ids": ["a-s", "b-s"], "parameters": {}, "complete": True,
             "created": 1700000000}
    write("csi_record", [bytes([0]) + json.dumps(vol).encode(), bytes([1]) + json.dumps(snap).encode(),
                         bytes([2]) + json.dumps(group).encode(), bytes([0]) + b'{"version": 2}'])


if __name__ == "__main__":
    xseg_payload()
    xseg_segment()
    xseg_requests()
    nbd_proto()
    nbd_session()
    control_protocol()
    maps()
    lock_object()
    json_docs()
    for t in sorted(os.listdir(ROOT)):
        print(t, len(os.listdir(os.path.join(ROOT, t))))
