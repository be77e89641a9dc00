"""Semantic diff (igvm_builder.diff) and ``igvm-builder diff``.

Pairs of files are made from one hand-built model with ``dataclasses.replace``: one page,
a range of pages, one register (SNP VMSA, native context, VBS), the guest policy, the ID
block, the platform set, page flags, a page's platforms, page order.  The JSON schema is
checked key by key (docs/REPRODUCIBLE_RELEASES.md, "diff JSON").
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import pytest

from igvm_builder.cli import main
from igvm_builder.diff import SCHEMA_VERSION, FileDiff, diff_files, render_text
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice
from igvm_builder.format.defs import PageDataFlags, PlatformType
from igvm_builder.platforms.cpu import CpuState
from igvm_builder.sev_vmsa import build_vmsa, parse_vmsa

SNP, TDX, NATIVE, VBS = 1, 2, 4, 8
ALL = SNP | TDX | NATIVE | VBS
KVM_VMSA_GPA = 0xFFFF_FFFF_F000
BASE = 0x100000
NPAGES = 64


def _page(i: int) -> bytes:
    return bytes([i & 0xFF, 0x5A]) * 2048


def make_file(*, pages: int = NPAGES) -> IgvmFile:
    state = CpuState.long64(rip=0x100000, gdt=0x1000, cr3=0x4000, rsi=0x2000)
    platforms = (
        H.SupportedPlatform(compatibility_mask=SNP, platform_type=PlatformType.SEV_SNP),
        H.SupportedPlatform(compatibility_mask=TDX, platform_type=PlatformType.TDX, shared_gpa_boundary=1 << 47),
        H.SupportedPlatform(compatibility_mask=NATIVE, platform_type=PlatformType.NATIVE),
        H.SupportedPlatform(compatibility_mask=VBS, platform_type=PlatformType.VSM_ISOLATION),
    )
    inits = (H.GuestPolicy(policy=0x30000, compatibility_mask=SNP), H.GuestPolicy(policy=0, compatibility_mask=TDX))
    directives: list[H.Header] = [H.PageData(gpa=BASE + i * 0x1000, compatibility_mask=ALL, data=_page(i))
                                  for i in range(pages)]
    directives += [
        H.PageData(gpa=0x200000, compatibility_mask=ALL),  # no data
        H.ParameterArea(number_of_bytes=0x1000, parameter_area_index=0),
        H.VpCount(parameter_area_index=0),
        H.ParameterInsert(gpa=0x300000, compatibility_mask=ALL, parameter_area_index=0),
        H.SnpIdBlock(compatibility_mask=SNP, ld=bytes(48), family_id=bytes(16), image_id=b"\x01" * 16),
        H.SnpVpContext(gpa=KVM_VMSA_GPA, compatibility_mask=SNP, vp_index=0, vmsa=state.vmsa(sev_features=1)),
        H.NativeVpContext(compatibility_mask=NATIVE, vp_index=0, context=state.native_context()),
        H.VbsVpContext(compatibility_mask=VBS, vp_index=0, vtl=0, registers=state.vbs_registers()),
    ]
    return IgvmFile(revision=1, platforms=platforms, initializations=inits, directives=tuple(directives)).validate()


def parsed(f: IgvmFile) -> IgvmFile:
    return IgvmFile.from_bytes(f.to_bytes())


def replace_directive(f: IgvmFile, pred, **changes) -> IgvmFile:
    out, hit = [], 0
    for h in f.directives:
        if pred(h):
            h = dataclasses.replace(h, **changes)
            hit += 1
        out.append(h)
    assert hit, "nothing replaced"
    return dataclasses.replace(f, directives=tuple(out))


def map_directives(f: IgvmFile, fn) -> IgvmFile:
    return dataclasses.replace(f, directives=tuple(x for h in f.directives for x in fn(h)))


@pytest.fixture(scope="module")
def base() -> IgvmFile:
    return parsed(make_file())


# --------------------------------------------------------------------------------- identical


def test_identical_model(base: IgvmFile) -> None:
    d = diff_files(base, parsed(make_file()))
    assert d.identical and d.verdict == "semantically-identical"
    assert not d.headers and not d.pages and not d.page_order
    assert all(not m.changed for m in d.measurements)
    assert {m.platform for m in d.measurements} == {"SEV_SNP", "TDX", "NATIVE", "VSM_ISOLATION"}
    assert d.page_counts == (NPAGES + 1, NPAGES + 1)
    assert diff_files(base, base, byte_identical=True).verdict == "byte-identical"


def test_pages_are_compared_in_place(base: IgvmFile) -> None:
    pages = [h for h in base.directives if isinstance(h, H.PageData) and len(h.data)]
    assert pages and all(isinstance(h.data, FileSlice) for h in pages)  # parsed: zero-copy windows


# --------------------------------------------------------------------------------- pages


def test_one_page_differs(base: IgvmFile) -> None:
    b = replace_directive(base, lambda h: isinstance(h, H.PageData) and h.gpa == 0x120000, data=b"\xee" * 4096)
    d = diff_files(base, parsed(b), a_name="a.igvm", b_name="b.igvm")
    assert not d.identical and d.verdict == "different"
    assert len(d.pages) == 1
    r = d.pages[0]
    assert (r.start, r.end, r.pages, r.aspect) == (0x120000, 0x120FFF, 1, "data")
    assert r.platforms == ("NATIVE", "VSM_ISOLATION", "SEV_SNP", "TDX")  # PlatformType order
    assert "page 0x120000 (1 page) differs in data" in render_text(d)
    changed = {m.platform for m in d.measurements if m.changed}
    assert changed == {"SEV_SNP", "TDX", "VSM_ISOLATION"}  # NATIVE has no measurement
    assert not d.headers


def test_page_range_coalesced(base: IgvmFile) -> None:
    gpas = range(0x110000, 0x120000, 0x1000)
    b = replace_directive(base, lambda h: isinstance(h, H.PageData) and h.gpa in gpas, data=bytes(4096))
    d = diff_files(base, b)
    assert [(r.start, r.end, r.pages, r.aspect) for r in d.pages] == [(0x110000, 0x11FFFF, 16, "data")]
    assert "pages 0x110000-0x11ffff (16 pages) differ in data" in d.render_text()
    assert d.differing_pages == 16


def test_page_flags_and_data_presence(base: IgvmFile) -> None:
    b = replace_directive(base, lambda h: isinstance(h, H.PageData) and h.gpa == 0x101000,
                          flags=PageDataFlags.UNMEASURED)
    b = replace_directive(b, lambda h: isinstance(h, H.PageData) and h.gpa == 0x200000, data=b"\x01" * 4096)
    d = diff_files(base, b)
    aspects = {(r.start, r.aspect, r.a, r.b) for r in d.pages}
    assert (0x101000, "flags", "0x0", "0x2") in aspects
    assert (0x200000, "data", "empty", "present") in aspects
    assert "page 0x101000 (1 page) differs in flags (0x0 -> 0x2)" in d.render_text()


def test_page_added_removed_and_per_platform(base: IgvmFile) -> None:
    def edit(h: H.Header):
        if isinstance(h, H.PageData) and h.gpa == 0x13F000:
            yield dataclasses.replace(h, compatibility_mask=ALL & ~TDX)  # TDX no longer gets it
            yield H.PageData(gpa=0x140000, compatibility_mask=SNP, data=_page(0x40))  # new SNP-only page
        elif isinstance(h, H.PageData) and h.gpa == 0x100000:
            return  # removed everywhere
        else:
            yield h

    d = diff_files(base, map_directives(base, edit))
    got = {(r.start, r.aspect, r.platforms) for r in d.pages}
    assert got == {
        (0x100000, "removed", ("NATIVE", "VSM_ISOLATION", "SEV_SNP", "TDX")),
        (0x13F000, "removed", ("TDX",)),
        (0x140000, "added", ("SEV_SNP",)),
    }
    text = d.render_text()
    assert "page 0x13f000 (1 page) only in A (removed) [TDX]" in text
    assert "page 0x140000 (1 page) only in B (added) [SEV_SNP]" in text


def test_page_order(base: IgvmFile) -> None:
    dirs = list(base.directives)
    dirs[3], dirs[4] = dirs[4], dirs[3]
    d = diff_files(base, dataclasses.replace(base, directives=tuple(dirs)))
    assert not d.pages
    assert (d.page_order[0].platform, d.page_order[0].first_gpa) == ("SEV_SNP", 0x103000)
    assert {o.platform for o in d.page_order} == {"SEV_SNP", "TDX", "NATIVE", "VSM_ISOLATION"}
    assert "page order differs for SEV_SNP" in d.render_text()
    assert not d.identical


# --------------------------------------------------------------------------------- VP registers


def test_snp_register(base: IgvmFile) -> None:
    def newer(h: H.SnpVpContext) -> bytes:
        fields = parse_vmsa(bytes(h.blob()))
        fields["rip"] = 0xFFF0
        fields["cs.base"] = 0xFFFF0000
        return build_vmsa(fields)

    vp = next(h for h in base.directives if isinstance(h, H.SnpVpContext))
    d = diff_files(base, replace_directive(base, lambda h: h is vp, vmsa=newer(vp)))
    (hc,) = d.headers
    assert (hc.change, hc.section, hc.header, hc.key) == ("changed", "directive", "SnpVpContext", "SEV_SNP vp 0")
    assert {(f.field, f.a, f.b) for f in hc.fields} == {("vmsa.rip", "0x100000", "0xfff0"),
                                                       ("vmsa.cs.base", "0x0", "0xffff0000")}
    assert [m.platform for m in d.measurements if m.changed] == ["SEV_SNP"]
    assert "vmsa.rip: 0x100000 -> 0xfff0" in d.render_text()


def test_snp_reserved_bytes(base: IgvmFile) -> None:
    vp = next(h for h in base.directives if isinstance(h, H.SnpVpContext))
    page = bytearray(bytes(vp.blob()))
    page[4000] = 1  # padding beyond the save area: no named field
    d = diff_files(base, replace_directive(base, lambda h: h is vp, vmsa=bytes(page)))
    (hc,) = d.headers
    assert [f.field for f in hc.fields] == ["vmsa.reserved_bytes"]


def test_native_register(base: IgvmFile) -> None:
    vp = next(h for h in base.directives if isinstance(h, H.NativeVpContext))
    ctx = bytearray(vp.context)
    struct.pack_into("<Q", ctx, 128, 0x200000)  # rip (offset 16*8)
    d = diff_files(base, replace_directive(base, lambda h: h is vp, context=bytes(ctx)))
    (hc,) = d.headers
    assert (hc.header, hc.key) == ("NativeVpContext", "NATIVE vp 0")
    assert [(f.field, f.a, f.b) for f in hc.fields] == [("context.rip", "0x100000", "0x200000")]
    assert not any(m.changed for m in d.measurements)  # NATIVE is not measured


def test_vbs_register(base: IgvmFile) -> None:
    vp = next(h for h in base.directives if isinstance(h, H.VbsVpContext))
    regs = tuple(H.VbsRegister(r.name, (0x1234).to_bytes(16, "little")) if r.name == 0x20010 else r
                 for r in vp.registers)
    d = diff_files(base, replace_directive(base, lambda h: h is vp, registers=regs))
    (hc,) = d.headers
    assert (hc.header, hc.key) == ("VbsVpContext", "VSM_ISOLATION vp 0")
    assert [(f.field, f.a, f.b) for f in hc.fields] == [("registers.Rip", "0x100000", "0x1234")]
    assert [m.platform for m in d.measurements if m.changed] == ["VSM_ISOLATION"]


# --------------------------------------------------------------------------------- policy, ID block


def test_policy(base: IgvmFile) -> None:
    inits = tuple(dataclasses.replace(h, policy=0x30000 | 0x80000) if h.compatibility_mask == SNP else h
                  for h in base.initializations)
    d = diff_files(base, dataclasses.replace(base, initializations=inits))
    (hc,) = d.headers
    assert (hc.change, hc.section, hc.header, hc.key, hc.index_a, hc.index_b) == \
        ("changed", "initialization", "GuestPolicy", "SEV_SNP", 4, 4)
    assert [(f.field, f.a, f.b) for f in hc.fields] == [("policy", "0x30000", "0xb0000"),
                                                        ("policy.debug", False, True)]
    assert not d.pages
    # the policy is not part of the SNP launch digest (it is checked by the PSP separately)
    assert "GuestPolicy [SEV_SNP] changed" in d.render_text()


def test_policy_reserved_bits(base: IgvmFile) -> None:
    # bit 21 is reserved in the SNP guest policy: the diff must name it, not report 0x0
    inits = tuple(dataclasses.replace(h, policy=0x30000 | 0x200000) if h.compatibility_mask == SNP else h
                  for h in base.initializations)
    (hc,) = diff_files(base, dataclasses.replace(base, initializations=inits)).headers
    assert ("policy.reserved", "0x0", "0x200000") in [(f.field, f.a, f.b) for f in hc.fields]


def test_tdx_policy_bits(base: IgvmFile) -> None:
    inits = tuple(dataclasses.replace(h, policy=0x2) if h.compatibility_mask == TDX else h
                  for h in base.initializations)
    (hc,) = diff_files(base, dataclasses.replace(base, initializations=inits)).headers
    assert ("policy.sept_ve_disable", False, True) in [(f.field, f.a, f.b) for f in hc.fields]


def test_id_block(base: IgvmFile) -> None:
    b = replace_directive(base, lambda h: isinstance(h, H.SnpIdBlock), family_id=b"\x42" * 16, guest_svn=3)
    (hc,) = diff_files(base, b).headers
    assert (hc.header, hc.key) == ("SnpIdBlock", "SEV_SNP")
    assert {(f.field, f.a, f.b) for f in hc.fields} == {("family_id", "00" * 16, "42" * 16),
                                                       ("guest_svn", "0x0", "0x3")}


def test_id_block_added(base: IgvmFile) -> None:
    b = map_directives(base, lambda h: () if isinstance(h, H.SnpIdBlock) else (h,))
    (hc,) = diff_files(b, base).headers
    assert (hc.change, hc.header, hc.index_a) == ("added", "SnpIdBlock", None)
    assert ("image_id", None, "01" * 16) in [(f.field, f.a, f.b) for f in hc.fields]


# --------------------------------------------------------------------------------- platform set


def test_platform_set(base: IgvmFile) -> None:
    def drop_tdx(h: H.Header):
        if isinstance(h, H.PageData | H.ParameterInsert):
            yield dataclasses.replace(h, compatibility_mask=h.compatibility_mask & ~TDX)
        else:
            yield h

    b = map_directives(base, drop_tdx)
    b = dataclasses.replace(b, platforms=tuple(p for p in b.platforms if p.platform_type != PlatformType.TDX),
                            initializations=tuple(h for h in b.initializations if h.compatibility_mask != TDX))
    d = diff_files(base, b.validate())
    assert d.platforms_removed == ("TDX",) and d.platforms_added == ()
    assert not d.pages  # the remaining platforms see the same pages
    kinds = {(h.change, h.header, h.key) for h in d.headers}
    assert ("removed", "SupportedPlatform", "TDX") in kinds
    assert ("removed", "GuestPolicy", "TDX") in kinds
    tdx = next(m for m in d.measurements if m.platform == "TDX")
    assert (tdx.in_a, tdx.in_b, tdx.changed, tdx.b) == (True, False, True, None)
    assert not any(m.changed for m in d.measurements if m.platform != "TDX")
    assert "platforms: SEV_SNP, TDX, NATIVE, VSM_ISOLATION -> SEV_SNP, NATIVE, VSM_ISOLATION (-TDX)" in \
        d.render_text()
    back = diff_files(b, base)
    assert back.platforms_added == ("TDX",)


def test_renumbered_masks_match(base: IgvmFile) -> None:
    """Masks are matched as platform sets: swapping two platforms' bits is a mask change only."""
    swap = {SNP: TDX, TDX: SNP}

    def remap(m: int) -> int:
        return sum(swap.get(bit, bit) for bit in (1, 2, 4, 8) if m & bit)

    b = dataclasses.replace(
        base,
        platforms=tuple(dataclasses.replace(p, compatibility_mask=remap(p.compatibility_mask)) for p in base.platforms),
        initializations=tuple(dataclasses.replace(h, compatibility_mask=remap(h.compatibility_mask))
                              for h in base.initializations),
        directives=tuple(dataclasses.replace(h, compatibility_mask=remap(h.compatibility_mask)) if h.HAS_MASK else h
                         for h in base.directives),
    )
    d = diff_files(base, b.validate())
    assert not d.pages and not any(m.changed for m in d.measurements)
    changed = {(h.header, h.key): [f.field for f in h.fields] for h in d.headers}
    assert changed[("SupportedPlatform", "SEV_SNP")] == ["compatibility_mask"]
    assert ("GuestPolicy", "SEV_SNP") in changed  # mask only
    assert all(fields == ["compatibility_mask"] for fields in changed.values())


def test_revision_change(base: IgvmFile) -> None:
    d = diff_files(base, dataclasses.replace(base, revision=2))
    assert [(f.field, f.a, f.b) for f in d.file_changes] == [("revision", 1, 2)]


# --------------------------------------------------------------------------------- JSON schema


def test_json_schema(base: IgvmFile) -> None:
    b = replace_directive(base, lambda h: isinstance(h, H.PageData) and h.gpa == 0x120000, data=b"\xee" * 4096)
    b = replace_directive(b, lambda h: isinstance(h, H.SnpIdBlock), guest_svn=1)
    doc = diff_files(base, b, a_name="a.igvm", b_name="b.igvm").as_dict()
    json.dumps(doc)  # serializable
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert set(doc) == {"schema_version", "a", "b", "verdict", "identical", "byte_identical", "loader", "summary",
                        "file", "platforms", "headers", "pages", "page_order", "measurements"}
    assert set(doc["summary"]) == {"headers_added", "headers_removed", "headers_changed", "page_ranges",
                                   "pages_differing", "page_order_changes", "measurements_changed", "pages_a",
                                   "pages_b"}
    assert set(doc["platforms"]) == {"a", "b", "added", "removed"}
    (h,) = doc["headers"]
    assert set(h) == {"change", "section", "header", "key", "index_a", "index_b", "fields"}
    assert h["fields"] == [{"field": "guest_svn", "a": "0x0", "b": "0x1"}]
    (p,) = doc["pages"]
    assert p == {"gpa_start": "0x120000", "gpa_end": "0x120fff", "pages": 1, "aspect": "data",
                 "platforms": ["NATIVE", "VSM_ISOLATION", "SEV_SNP", "TDX"], "a": None, "b": None}
    m = doc["measurements"][0]
    assert set(m) == {"platform", "algorithm", "a", "b", "error_a", "error_b", "in_a", "in_b", "changed"}
    assert (doc["verdict"], doc["identical"], doc["summary"]["headers_changed"]) == ("different", False, 1)


def test_measurement_errors_are_reported(base: IgvmFile) -> None:
    # the qemu profile rejects VMSAs not at the KVM GPA
    b = replace_directive(base, lambda h: isinstance(h, H.SnpVpContext), gpa=0x5000)
    d = diff_files(base, b, loader="qemu")
    snp = next(m for m in d.measurements if m.platform == "SEV_SNP")
    assert snp.a is not None and snp.b is None and "0x5000" in (snp.error_b or "")
    assert snp.changed


def test_frozen(base: IgvmFile) -> None:
    d = diff_files(base, base)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.a_name = "x"  # type: ignore[misc]
    assert isinstance(d, FileDiff)


# --------------------------------------------------------------------------------- CLI


def undedup(data: bytes) -> bytes:
    """The same file with the first deduplicated page blob stored twice (a non-canonical layout)."""
    fixed = struct.unpack_from("<6I", data)
    voff, vsize = fixed[2], fixed[3]
    seen: dict[int, int] = {}
    pos = voff
    out = bytearray(data)
    while pos < voff + vsize:
        typ, length = struct.unpack_from("<II", data, pos)
        if typ == 0x302:
            foff = struct.unpack_from("<I", data, pos + 8 + 12)[0]
            if foff and foff in seen:
                new_off = len(out)
                out += data[foff : foff + 4096]
                struct.pack_into("<I", out, pos + 8 + 12, new_off)
                break
            seen[foff] = pos
        pos += 8 + ((length + 7) & ~7)
    else:
        raise AssertionError("no deduplicated page")
    struct.pack_into("<I", out, 16, len(out))
    out[20:24] = bytes(4)
    crc = zlib.crc32(bytes(out[voff : voff + vsize]), zlib.crc32(bytes(out[:24])))
    struct.pack_into("<I", out, 20, crc)
    return bytes(out)


@pytest.fixture
def files(tmp_path: Path, base: IgvmFile) -> dict[str, Path]:
    a = tmp_path / "a.igvm"
    a.write_bytes(base.to_bytes())
    same = tmp_path / "same.igvm"
    same.write_bytes(base.to_bytes())
    dup = make_file()
    dup = replace_directive(dup, lambda h: isinstance(h, H.PageData) and h.gpa in (0x101000, 0x102000),
                            data=b"\x07" * 4096)
    dup_a = tmp_path / "dup.igvm"
    dup_a.write_bytes(dup.to_bytes())
    layout = tmp_path / "layout.igvm"
    layout.write_bytes(undedup(dup.to_bytes()))
    b = tmp_path / "b.igvm"
    b.write_bytes(replace_directive(base, lambda h: isinstance(h, H.PageData) and h.gpa == 0x120000,
                                    data=b"\xee" * 4096).to_bytes())
    bad = tmp_path / "bad.igvm"
    bad.write_bytes(b"IGVM" + bytes(40))
    return {"a": a, "same": same, "dup": dup_a, "layout": layout, "b": b, "bad": bad, "missing": tmp_path / "no"}


def test_cli_byte_identical(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(files["a"]), str(files["same"])]) == 0
    assert capsys.readouterr().out == f"{files['a']} and {files['same']} are byte-identical\n"


def test_cli_semantically_identical(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert files["dup"].read_bytes() != files["layout"].read_bytes()
    assert main(["diff", str(files["dup"]), str(files["layout"])]) == 0
    out = capsys.readouterr().out
    assert "are semantically identical (bytes differ" in out
    assert main(["diff", "--json", str(files["dup"]), str(files["layout"])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["verdict"], doc["identical"], doc["byte_identical"]) == ("semantically-identical", True, False)


def test_cli_different(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(files["a"]), str(files["b"])]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{files['a']} and {files['b']} differ: 0 header(s) added")
    assert "  page 0x120000 (1 page) differs in data [NATIVE, VSM_ISOLATION, SEV_SNP, TDX]" in out.splitlines()
    assert any(line.startswith("  measurement SEV_SNP: ") and " -> " in line for line in out.splitlines())
    assert main(["diff", "--json", "--loader", "qemu", str(files["a"]), str(files["b"])]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["loader"] == "qemu" and doc["pages"][0]["gpa_start"] == "0x120000"


def test_cli_errors(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(files["a"]), str(files["bad"])]) == 2
    assert "igvm-builder diff: error:" in capsys.readouterr().err
    assert main(["diff", str(files["a"]), str(files["missing"])]) == 2
    assert "No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["diff", str(files["a"])])
    assert exc.value.code == 2
