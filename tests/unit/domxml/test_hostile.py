"""Hostile or unusual domain documents: prolog, DTDs, encodings, group names, digits.

Each case here failed on the code before issue 10's fixes: the document-level round trip
dropped comments and processing instructions, DTDs gave output that was not well-formed
(and an ATTLIST default could add a ``state-dir``), UTF-16 documents reached the hook,
any group name was written into paths and shmem names, and Unicode digits were read
as sizes.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from libshare import config, domxml
from libshare.domxml import devices as dev
from libshare.domxml import metadata
from libshare.domxml.tree import to_bytes
from libshare.errors import LibshareError, RefusedError, UsageError
from libshare.hook import handler, state
from libshare.util.digest import sha256_file
from libshare.util.units import parse_size

MiB = 1 << 20
BODY = """<domain type="qemu">
  <name>h</name>
  <memory unit="MiB">256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
  </os>
  <devices/>
</domain>"""
PROLOG = "<!-- managed by ansible: do not edit -->\n<?xml-stylesheet href='d.xsl'?>\n"
EPILOG = "\n<!-- end of h -->\n<?app keep='yes'?>"


def spec(group: str = "g", model: str = "nvdimm", path: str = "/r/a.img") -> domxml.RegionSpec:
    # no state_dir: the hook tests then log into their config's (temporary) state dir
    return domxml.RegionSpec(path, 64 * MiB, group, model=model, digest="d" * 64)


def doc_c14n(root: etree._Element) -> bytes:
    """C14N of the whole document, comments and PIs outside the root included."""
    return etree.tostring(root.getroottree(), method="c14n", with_comments=True)


# -- comments and processing instructions outside the root element ----------------------

@pytest.mark.parametrize("model", ["nvdimm", "virtio-pmem", "ivshmem"])
def test_prolog_and_epilog_survive_enable_and_disable(model: str) -> None:
    text = PROLOG + BODY + EPILOG + "\n"
    root = domxml.parse(text)
    enabled = domxml.enable(root, spec(model=model))
    out = domxml.serialize(enabled)
    assert out.startswith(PROLOG) and out.endswith(EPILOG + "\n")
    back = domxml.disable(domxml.parse(out))
    assert doc_c14n(back) == doc_c14n(root)
    assert domxml.serialize(back) == text
    # idempotent at the document level too
    assert doc_c14n(domxml.enable(enabled, spec(model=model))) == doc_c14n(enabled)


def test_serialize_without_prolog_is_unchanged() -> None:
    assert domxml.serialize(domxml.parse(BODY)) == BODY + "\n"


def test_hook_migrate_output_keeps_prolog_and_parses(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "state"
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text(f'state_dir = "{state_dir}"\n')
    image = state_dir / "regions" / "images" / "x.img"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"\x01" * (2 * MiB))
    digest = sha256_file(image)
    local = image.with_name(f"{digest}.img")
    image.rename(local)
    s = domxml.RegionSpec("/elsewhere/region.img", 2 * MiB, "g", digest=digest,
                          state_dir=str(state_dir))
    xml = PROLOG + domxml.serialize(domxml.enable(domxml.parse(BODY), s))
    out = io.StringIO()
    assert handler.run(["h", "migrate", "begin", "-"], xml.encode(), out=out) == 0
    assert out.getvalue().startswith(PROLOG)
    assert domxml.parse(out.getvalue()).findtext("devices/memory/source/path") == str(local)


# -- DTDs: refused, never honoured ------------------------------------------------------

ENTITY_NAME = """<!DOCTYPE domain [
<!ENTITY nm "evil">
]>
<domain type='qemu'><name>&nm;</name><memory unit='MiB'>256</memory>
<os><type arch='x86_64'>hvm</type></os><devices/></domain>"""
ENTITY_PATH = """<!DOCTYPE domain [<!ENTITY p "/etc/shadow">]>
<domain type='qemu'><name>h</name><memory unit='MiB'>256</memory>
<os><type arch='x86_64'>hvm</type></os>
<devices><disk type='file'><source file='&p;'/><target dev='vda'/></disk></devices></domain>"""
EXTERNAL = """<!DOCTYPE domain SYSTEM "file:///etc/passwd">
<domain type='qemu'><name>h</name></domain>"""
BARE = "<!DOCTYPE domain>\n" + BODY


@pytest.mark.parametrize("text", [ENTITY_NAME, ENTITY_PATH, EXTERNAL, BARE],
                         ids=["entity-name", "entity-path", "external", "bare"])
def test_doctype_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(RefusedError, match="DOCTYPE") as exc:
        domxml.parse(text)
    assert "\n" not in str(exc.value)


def _attlist_doc(state_dir: Path, image: Path) -> bytes:
    """An enrolled document whose DTD gives the record a defaulted ``state-dir``."""
    s = domxml.RegionSpec(str(image), image.stat().st_size, "g", digest=sha256_file(image))
    body = domxml.serialize(domxml.enable(domxml.parse(BODY), s))
    dtd = (f"<!DOCTYPE domain [<!ATTLIST libshare:enrolment state-dir CDATA "
           f"\"{state_dir}\">]>\n")
    return (dtd + body).encode()


@pytest.mark.parametrize("op", ["prepare", "migrate", "started"])
def test_hook_never_honours_an_attlist_default(tmp_path: Path, op: str,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    own = tmp_path / "own-state"
    evil = tmp_path / "evil-state"
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text(f'state_dir = "{own}"\n')
    image = tmp_path / "r.img"
    image.write_bytes(b"\x01" * (2 * MiB))
    out = io.StringIO()
    status = handler.run(["h", op, "begin", "-"], _attlist_doc(evil, image), out=out)
    assert status == (0 if op == "started" else 1)
    assert out.getvalue() == ""  # migrate printed nothing
    assert not evil.exists()
    log = state.read_hook_log(own)
    assert log and "DOCTYPE" in log[-1]["result"]
    assert state.read_running(own) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1


# -- encodings --------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    BODY.encode("utf-16"),                      # with a BOM
    BODY.encode("utf-16-le"),                   # without
    BODY.encode("utf-32"),
    ("<?xml version='1.0' encoding='UTF-16'?>\n" + BODY),  # str that says UTF-16
    ("<?xml version='1.0' encoding='ISO-8859-1'?>\n" + BODY).encode("latin-1"),
    BODY.replace("<name>h</name>", "<name>h\xe9</name>").encode("latin-1"),
    BODY.replace("<name>h</name>", "<name>h\udcff</name>"),  # lone surrogate
], ids=["utf16-bom", "utf16-nobom", "utf32", "str-declared-utf16", "latin1-declared",
        "latin1-undeclared", "surrogate"])
def test_non_utf8_documents_are_refused(data: bytes | str) -> None:
    with pytest.raises(RefusedError) as exc:
        domxml.parse(data)
    assert "UTF-8" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("data", [b"<domain>\x01</domain>", b"<domain><a></domain>",
                                  b"\xef\xbb\xbf", b""])
def test_not_well_formed_is_one_line(data: bytes) -> None:
    with pytest.raises(RefusedError, match="not well-formed") as exc:
        domxml.parse(data)
    assert "\n" not in str(exc.value)


def test_utf8_with_declaration_and_bom_is_read() -> None:
    text = "<?xml version='1.0' encoding='utf-8'?>\n" + BODY.replace("<name>h", "<name>hé")
    assert domxml.parse(b"\xef\xbb\xbf" + text.encode()).findtext("name") == "hé"


def test_hook_refuses_prepare_of_utf16_enrolled_domain(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text(f'state_dir = "{tmp_path / "s"}"\n')
    xml = domxml.serialize(domxml.enable(domxml.parse(BODY), spec()))
    assert handler.run(["h", "prepare", "begin", "-"], xml.encode("utf-16")) == 1
    assert "UTF-8" in state.read_hook_log(tmp_path / "s")[-1]["result"]


def test_character_references_are_plain_text() -> None:
    # not entities: XML itself defines them, libvirt reads the same path
    root = domxml.parse(BODY.replace("<devices/>", "<devices><disk type='file'>"
                                     "<source file='/var/&#108;ib/x.img'/></disk></devices>"))
    assert root.find("devices/disk/source").get("file") == "/var/lib/x.img"  # type: ignore


# -- group names: one rule everywhere ---------------------------------------------------

BAD_GROUPS = ["", "a/../../b", "..", "a..b", ".hidden", "-x", "a b", "a\nb", "x" * 65,
              "caf\xe9", "\u0663", "a/b", "a\x00"]
GOOD_GROUPS = ["default", "web", "a", "A-1_b.c", "x" * 64, "9lives"]


@pytest.mark.parametrize("name", BAD_GROUPS)
def test_bad_group_names_are_refused_everywhere(name: str, tmp_path: Path) -> None:
    assert not metadata.valid_group(name)
    with pytest.raises(RefusedError) as exc:
        metadata.check_group(name)
    assert "\n" not in str(exc.value).replace(repr(name), "")
    with pytest.raises(RefusedError):
        domxml.enable(domxml.parse(BODY), spec(group=name, model="ivshmem"))
    with pytest.raises(RefusedError):
        domxml.enable(domxml.parse(BODY), spec(group=name))
    with pytest.raises(RefusedError):
        dev.shmem_name(name)
    with pytest.raises(RefusedError):
        config.Config(state_dir=tmp_path).group_region_link(name)


@pytest.mark.parametrize("name", GOOD_GROUPS)
def test_good_group_names_pass(name: str) -> None:
    assert metadata.check_group(name) == name
    out = domxml.enable(domxml.parse(BODY), spec(group=name, model="ivshmem"))
    assert out.find("devices/shmem").get("name") == f"libshare-{name}"  # type: ignore


def test_config_default_group_is_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('default_group = "a/../../b"\n')
    with pytest.raises(LibshareError, match="default_group"):
        config.load(cfg)


def test_recorded_bad_group_is_refused_but_can_be_undone() -> None:
    root = domxml.parse(BODY)
    out = domxml.enable(root, spec(model="ivshmem", group="g"))
    rec = out.find(f"metadata/{{{domxml.NS}}}enrolment")
    assert rec is not None
    rec.set("group", "../../etc")
    out.find("devices/shmem").set("name", "libshare-../../etc")  # type: ignore[union-attr]
    with pytest.raises(RefusedError, match="invalid group name"):
        domxml.enrolment(out)
    with pytest.raises(RefusedError, match="invalid group name"):
        domxml.describe(out)
    assert domxml.is_enrolled(out)
    back = domxml.disable(out)
    assert doc_c14n(back) == doc_c14n(root)
    # re-enrolling replaces the bad record
    again = domxml.enable(out, spec(model="ivshmem", group="g"))
    assert domxml.describe(again)["group"] == "g"
    assert [s.get("name") for s in again.findall("devices/shmem")] == ["libshare-g"]


def test_hook_refuses_prepare_of_recorded_bad_group(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBSHARE_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text(f'state_dir = "{tmp_path / "s"}"\n')
    out = domxml.enable(domxml.parse(BODY), spec(model="ivshmem"))
    rec = out.find(f"metadata/{{{domxml.NS}}}enrolment")
    assert rec is not None
    rec.set("group", "../../../tmp/x")
    assert handler.run(["h", "prepare", "begin", "-"], domxml.serialize(out).encode()) == 1
    assert "invalid group name" in state.read_hook_log(tmp_path / "s")[-1]["result"]


def cli(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "LIBSHARE_CONFIG": "", "LC_ALL": "C",
           "LIBSHARE_STATE_DIR": str(tmp / "state")}
    return subprocess.run([sys.executable, "-m", "libshare", *args], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize("group", ["", "a/../../b"])
@pytest.mark.parametrize("command", [
    ["xml", "enable", "--group", "GROUP", "--model", "ivshmem", "--size", "4M", "DOC"],
    ["region", "build", "--group", "GROUP"],
    ["enable", "--group", "GROUP", "--connect", "test:///default", "test"],
], ids=["xml-enable", "region-build", "enable"])
def test_cli_refuses_bad_group_in_one_line(tmp_path: Path, group: str,
                                           command: list[str]) -> None:
    doc = tmp_path / "d.xml"
    doc.write_text(BODY)
    argv = [str(doc) if a == "DOC" else group if a == "GROUP" else a for a in command]
    res = cli(*argv, tmp=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and "invalid --group" in res.stderr, res.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.img"))


# -- sizes: ASCII digits only -----------------------------------------------------------

ARABIC_INDIC_512 = "\u0665\u0661\u0662"
EXTENDED_64 = "\u06f6\u06f4"


@pytest.mark.parametrize("text", [ARABIC_INDIC_512, "5\u0661\u0662", "\uff15\uff11\uff12",
                                  "\u00b2", "512\u00b2", " "])
def test_to_bytes_refuses_non_ascii_digits(text: str) -> None:
    with pytest.raises(RefusedError):
        to_bytes(text, "KiB")


def test_to_bytes_reads_ascii() -> None:
    assert to_bytes(" 512\n", "MiB") == 512 * MiB


@pytest.mark.parametrize("where", ["memory", "cell", "maxMemory", "currentMemory"])
def test_enable_refuses_non_ascii_memory_values(where: str) -> None:
    text = BODY
    if where == "memory":
        text = text.replace(">256</memory>", f">{ARABIC_INDIC_512}</memory>")
        assert ARABIC_INDIC_512 in text
    elif where == "cell":
        text = text.replace("<vcpu>1</vcpu>", f"<vcpu>1</vcpu><cpu><numa><cell id='0' "
                            f"cpus='0' memory='{ARABIC_INDIC_512}' unit='MiB'/></numa></cpu>")
    elif where == "maxMemory":
        text = text.replace("<vcpu>", f"<maxMemory slots='2' unit='GiB'>{EXTENDED_64}"
                            "</maxMemory><vcpu>")
    else:
        text = text.replace("<vcpu>", f"<currentMemory>{ARABIC_INDIC_512}</currentMemory>"
                            "<vcpu>")
    root = domxml.parse(text)
    with pytest.raises(RefusedError, match="cannot read"):
        domxml.enable(root, spec())


def test_unicode_digits_elsewhere_never_crash() -> None:
    # superscript digits pass str.isdigit() but int() raises ValueError
    text = BODY.replace("<vcpu>1</vcpu>", "<vcpu>\u00b2</vcpu>")
    out = domxml.enable(domxml.parse(text), spec())
    assert out.find("cpu/numa/cell").get("cpus") == "0"  # type: ignore[union-attr]
    rec = out.find(f"metadata/{{{domxml.NS}}}enrolment")
    assert rec is not None
    rec.set("memory-kib", "\u00b2")
    rec.set("size", ARABIC_INDIC_512)
    enr = domxml.enrolment(out)
    assert enr is not None and enr.memory_kib is None
    with pytest.raises(RefusedError, match="bad region size"):
        enr.checked_size()


@pytest.mark.parametrize("text", [EXTENDED_64 + "M", "\u0661\u0660\u0662\u0664",
                                  "\uff16\uff14M", "64\u2009M"])
def test_parse_size_refuses_non_ascii(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_parse_size_still_reads_ascii() -> None:
    assert parse_size(" 64M ") == 64 * MiB and parse_size("2 GiB") == 2 << 30
