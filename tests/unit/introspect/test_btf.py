"""BTF parser: the host kernel's own BTF (/sys/kernel/btf/vmlinux) and synthetic blobs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from libshare.introspect.btf import (
    KIND_INT,
    KIND_PTR,
    KIND_STRUCT,
    KIND_UNION,
    Btf,
    BtfError,
    find_btf,
    parse_header,
)
from libshare.introspect.layout import (
    REQUIRED,
    LayoutError,
    layout_from_btf,
    layout_from_isf,
    layout_from_offsets,
)

VMLINUX = Path("/sys/kernel/btf/vmlinux")


@pytest.fixture(scope="module")
def host_btf() -> Btf:
    try:
        data = VMLINUX.read_bytes()
    except OSError:
        pytest.skip("no readable /sys/kernel/btf/vmlinux")
    return Btf(data)


def test_host_task_struct_offsets_are_sane(host_btf: Btf) -> None:
    size = host_btf.struct_size("task_struct")
    assert 2000 < size < 16384
    offs = {m: host_btf.offsetof("task_struct", m)
            for m in ("tasks", "pid", "tgid", "comm", "mm", "active_mm", "group_leader")}
    assert all(0 < v < size for v in offs.values())
    assert offs["tgid"] == offs["pid"] + 4  # pid_t pid; pid_t tgid;
    assert offs["active_mm"] == offs["mm"] + 8
    assert host_btf.sizeof(host_btf.member("task_struct", "comm").type_id) == 16
    assert host_btf.kind(host_btf.resolve(host_btf.member("task_struct", "mm").type_id)) == KIND_PTR


def test_host_anonymous_members_and_paths(host_btf: Btf) -> None:
    # mm_struct's members live in an anonymous struct; qstr.len in an anonymous union.
    assert host_btf.offsetof("mm_struct", "mm_mt") >= 0
    assert host_btf.offsetof("dentry", "d_name.len") == host_btf.offsetof("dentry", "d_name") + 4
    assert host_btf.offsetof("dentry", "d_name.name") == host_btf.offsetof("dentry", "d_name") + 8
    assert host_btf.offsetof("maple_range_64", "meta") == 248  # inside an anonymous union
    assert host_btf.offsetof("maple_arange_64", "slot") == 80
    with pytest.raises(BtfError):
        host_btf.offsetof("task_struct", "no_such_member")
    with pytest.raises(BtfError):
        host_btf.struct_id("no_such_struct_xyz")


def test_host_bitfield(host_btf: Btf) -> None:
    bitfields = [m for m in host_btf.members(host_btf.struct_id("task_struct")) if m.bit_size]
    assert bitfields, "task_struct has bitfields (sched_reset_on_fork, in_execve...)"
    assert all(m.bit_size < 64 for m in bitfields)


def test_host_layout_complete(host_btf: Btf) -> None:
    host_btf.validate_kernel()
    layout = layout_from_btf(host_btf)
    assert all(layout.has(k) for k in REQUIRED)
    assert layout.maple


def _blob(types: bytes, strings: bytes) -> bytes:
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def _tiny(with_task: bool) -> bytes:
    names = b"\0int\0task_struct\0pid\0u\0a\0"
    off = {n: names.index(n.encode() + b"\0") for n in ("int", "task_struct", "pid", "u", "a")}
    types = struct.pack("<III", off["int"], KIND_INT << 24, 4) + struct.pack("<I", 32)  # 1
    name = off["task_struct"] if with_task else 0
    # 2: union { int a; } (anonymous members of 3)
    types += struct.pack("<III", 0, (KIND_UNION << 24) | 1, 4)
    types += struct.pack("<III", off["a"], 1, 0)
    # 3: struct task_struct { int pid; union { int a; }; int u:3 (bitfield, kflag) }
    types += struct.pack("<III", name, (1 << 31) | (KIND_STRUCT << 24) | 3, 12)
    types += struct.pack("<III", off["pid"], 1, 0)
    types += struct.pack("<III", 0, 2, 32)
    types += struct.pack("<III", off["u"], 1, (3 << 24) | 64)
    return _blob(types, names)


def test_synthetic_blob_members() -> None:
    btf = Btf(_tiny(True))
    assert btf.ntypes == 3
    assert btf.offsetof("task_struct", "pid") == 0
    assert btf.offsetof("task_struct", "a") == 4  # through the anonymous union
    u = btf.member("task_struct", "u")
    assert (u.bit_offset, u.bit_size) == (64, 3)
    with pytest.raises(BtfError, match="lacks"):
        btf.validate_kernel()  # no mm_struct, vm_area_struct...


def test_bad_and_truncated_blobs() -> None:
    blob = _tiny(True)
    assert parse_header(blob) is not None
    assert parse_header(b"\x9f\xeb\x02\x00" + blob[4:]) is None  # version 2
    with pytest.raises(BtfError, match="truncated"):
        Btf(blob[:-3])
    bad = bytearray(blob)
    bad[24 + 7] = 31  # kind 31 does not exist
    with pytest.raises(BtfError, match="unknown BTF kind"):
        Btf(bytes(bad))
    huge = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 1 << 30, 1 << 30, 10)
    assert parse_header(huge) is None  # absurd lengths refused before any allocation


def test_find_btf_sees_every_header() -> None:
    partial = _tiny(False)
    full = _tiny(True)
    mem = b"\0" * 100 + partial + b"\xff" * 50 + full
    hits = [addr for addr, _ in find_btf([(0x1000, mem)])]
    assert hits == [0x1000 + 100, 0x1000 + 100 + len(partial) + 50]


def test_offsets_file_and_isf(tmp_path: Path, host_btf: Btf) -> None:
    layout = layout_from_btf(host_btf)
    text = "# offsets\n" + "\n".join(f"{k} {hex(v)}" for k, v in layout.offsets.items())
    p = tmp_path / "offsets.txt"
    p.write_text(text + "\nsizeof(task_struct) 3264\n")
    back = layout_from_offsets(p)
    assert back.offsets == layout.offsets
    assert back.size("task_struct") == 3264
    (tmp_path / "bad.txt").write_text("task_struct.comm\n")
    with pytest.raises(LayoutError):
        layout_from_offsets(tmp_path / "bad.txt")
    (tmp_path / "short.json").write_text('{"task_struct.comm": 1}')
    with pytest.raises(LayoutError, match="lacks"):
        layout_from_offsets(tmp_path / "short.json")
    # A Volatility3-style ISF: dotted paths and anonymous members.
    user_types: dict[str, dict[str, object]] = {}
    for key, value in layout.offsets.items():
        struct_name, _, path = key.partition(".")
        parts = path.split(".")
        fields = user_types.setdefault(struct_name, {"size": 8, "fields": {}})["fields"]
        assert isinstance(fields, dict)
        if len(parts) == 1:
            fields[parts[0]] = {"offset": value, "type": {"kind": "base", "name": "long"}}
        else:  # e.g. dentry.d_name.len -> qstr with an anonymous member holding len
            outer = layout.offsets.get(f"{struct_name}.{parts[0]}",
                                       value - 4 if parts[1] == "len" else value - 8)
            fields[parts[0]] = {"offset": outer, "type": {"kind": "struct", "name": "qstr"}}
            q = user_types.setdefault("qstr", {"size": 16, "fields": {}})["fields"]
            assert isinstance(q, dict)
            q["name"] = {"offset": 8, "type": {"kind": "pointer"}}
            q["unnamed_field_0"] = {"offset": 0, "type": {"kind": "union", "name": "anon_q"}}
            user_types["anon_q"] = {"size": 8, "fields": {"len": {"offset": 4,
                                                                   "type": {"kind": "base"}}}}
    import json
    (tmp_path / "k.isf.json").write_text(json.dumps({"user_types": user_types}))
    isf = layout_from_isf(tmp_path / "k.isf.json")
    for key in REQUIRED:
        assert isf.off(key) == layout.off(key), key


def test_layout_store_spares_parsing_a_known_blob(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """load_layout parses and validates a BTF blob once; the same bytes found again
    (another boot or guest of that kernel build, another process through the
    btf-v<format>-<digest>.json file) give the same layout without parsing; other bytes
    do not."""
    from libshare.introspect import cache, discover
    from libshare.introspect.memory import BytesMemory

    try:
        blob = VMLINUX.read_bytes()
    except OSError:
        pytest.skip("no readable /sys/kernel/btf/vmlinux")
    mem = BytesMemory(bytes(4096) + blob)
    monkeypatch.setattr(cache, "_BTF_LAYOUTS", {})
    store = cache.BtfLayouts(tmp_path)
    addr, first = discover.load_layout(mem, [4096], store)
    assert addr == 4096 and first.offsets == layout_from_btf(Btf(blob)).offsets
    assert store.path(discover.btf_digest(blob)).exists()
    parsed: list[int] = []
    monkeypatch.setattr(discover, "Btf", lambda data: parsed.append(1) or Btf(data))
    assert discover.load_layout(mem, [4096], store)[1] is first  # in-process
    monkeypatch.setattr(cache, "_BTF_LAYOUTS", {})  # a new process: from the file
    again = discover.load_layout(mem, [4096], cache.BtfLayouts(tmp_path))[1]
    assert again.offsets == first.offsets and again.sizes == first.sizes and not parsed
    changed = bytearray(blob)
    changed[-2] ^= 0xFF  # another blob (a string byte): parsed and validated afresh
    discover.load_layout(BytesMemory(bytes(4096) + changed), [4096], store)
    assert parsed == [1]


def test_a_bad_layout_cache_file_only_costs_a_parse(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache file that is not a valid layout (a key missing, garbage) is ignored: the
    blob is parsed again and the file rewritten."""
    from libshare.introspect import cache, discover
    from libshare.introspect.memory import BytesMemory

    try:
        blob = VMLINUX.read_bytes()
    except OSError:
        pytest.skip("no readable /sys/kernel/btf/vmlinux")
    mem = BytesMemory(bytes(4096) + blob)
    store = cache.BtfLayouts(tmp_path)
    path = store.path(discover.btf_digest(blob))
    for bad in ('{"task_struct.comm": 1}', "not json", "[1, 2]"):
        monkeypatch.setattr(cache, "_BTF_LAYOUTS", {})
        path.write_text(bad)
        _addr, layout = discover.load_layout(mem, [4096], store)
        assert layout.offsets == layout_from_btf(Btf(blob)).offsets
        assert path.read_text() != bad
