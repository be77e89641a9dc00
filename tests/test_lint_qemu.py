"""``lint --loader qemu`` against QEMU itself (issue #12, item 4).

For every IGVM header type a small file containing it is launched in the bundled QEMU 10.2.2
(``../shared/tools/qemu-igvm`` through ``tests/qemu.py``, TCG, no confidential-guest object; a
missing QEMU fails, never skips); lint with ``--qemu-guest
none`` must report an error exactly when QEMU refuses the file, and that error must name the
header type.  The files' NATIVE guest leaves at once through QEMU's ``isa-debug-exit`` device
(exit status 33), so a file QEMU loads ends the run by itself: 33 means loaded, 1 with a
``qemu-system-x86_64:`` message means refused, anything else fails the test.  Platforms: files
without a NATIVE platform (SEV-SNP, TDX, both, a real OVMF build) are refused without a
confidential-guest object with QEMU's "does not describe a compatible supported platform",
which lint must say too.  Confidential-guest objects need SEV/TDX hardware: those rules of
``igvm_builder.qemu_loader`` are read from QEMU's source and only unit-tested here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu import qemu_binary, run_qemu
from test_build_helpers import GRUB, IPXE, MEMTEST, OVMF_BOOKWORM, UBOOT, VMLINUZ, build_bytes, config, q

from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import Architecture, HeaderType, PlatformType
from igvm_builder.lint import Finding, lint
from igvm_builder.platforms.cpu import CpuState, gdt_bytes
from igvm_builder.qemu_loader import QEMU_HANDLED
from igvm_builder.qemu_loader import qemu_findings as _qemu_findings

DEBUG_EXIT = 0xF4
LOADED = (0x10 << 1) | 1  # isa-debug-exit: the guest wrote 0x10
#: mov al, 0x10; out 0xf4, al; hlt (the same bytes in real and 32-bit protected mode)
EXIT_CODE = bytes([0xB0, 0x10, 0xE6, DEBUG_EXIT, 0xF4])
PAGE = 0x1000
REFUSED_PLATFORM = "IGVM file does not describe a compatible supported platform"


@dataclass(frozen=True)
class Outcome:
    loaded: bool
    message: str


def launch(path: Path) -> Outcome:
    """Launch ``path`` under TCG (``tests/qemu.py``: bounded to 60 s, QEMU killed on a timeout)."""
    run = run_qemu(path, "-no-reboot", "-device", f"isa-debug-exit,iobase={DEBUG_EXIT:#x},iosize=0x04", timeout=60)
    if run.status == LOADED:
        return Outcome(True, "")
    if run.status == 1 and run.stderr.startswith("qemu-system-x86_64: "):
        return Outcome(False, run.stderr.strip())
    pytest.fail(f"QEMU neither refused {path.name} nor ran it to the guest's exit; " + run.report(), pytrace=False)


# --------------------------------------------------------------------------- the files

NATIVE = H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.NATIVE)
SNP = H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.SEV_SNP)
SNP_POLICY = H.GuestPolicy(policy=0x30000, compatibility_mask=2)
#: The reset vector (real mode, CS base 0xFFFF0000, IP 0xFFF0) leaves through isa-debug-exit.
RESET = H.PageData(gpa=0xFFFF_F000, compatibility_mask=1, data=(bytes(0xFF0) + EXIT_CODE).ljust(PAGE, b"\0"))
GDT = H.PageData(gpa=0x1000, compatibility_mask=1, data=gdt_bytes().ljust(PAGE, b"\0"))
CODE = H.PageData(gpa=0x2000, compatibility_mask=1, data=EXIT_CODE.ljust(PAGE, b"\0"))
#: Flat 32-bit protected mode at CODE: the same exit through a VP context.
VP = H.NativeVpContext(compatibility_mask=1, context=CpuState.protected32(rip=0x2000, gdt=0x1000).native_context())
VBS = H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.VSM_ISOLATION)
#: The VBS VP context a relocation region needs (VBS-only headers; QEMU skips its mask 2).
VBS_VP = H.VbsVpContext(compatibility_mask=2, vp_index=0, vtl=0,
                        registers=CpuState.protected32(rip=0x2000, gdt=0x1000).vbs_registers())
AREA = H.ParameterArea(parameter_area_index=0, number_of_bytes=PAGE)
INSERT = H.ParameterInsert(gpa=0x10000, compatibility_mask=1, parameter_area_index=0)


def native(*directives: H.Header, inits: tuple[H.Header, ...] = (), platforms: tuple[H.SupportedPlatform, ...] = ()
           ) -> IgvmFile:
    return IgvmFile(platforms=(NATIVE, *platforms), initializations=inits, directives=(RESET, *directives))


def _usage(kind: type[H.Header]) -> Callable[[], IgvmFile]:
    return lambda: native(AREA, kind(parameter_area_index=0), INSERT)  # type: ignore[call-arg]


#: One file per header type, each a NATIVE launch QEMU can run to the exit when it loads it.
#: A header that belongs to another platform (SNP_ID_BLOCK, VBS_MEASUREMENT, the relocation
#: regions) carries that platform's mask in a NATIVE + that platform file: QEMU dispatches every
#: header whatever its mask.
FILES: dict[HeaderType, Callable[[], IgvmFile]] = {
    HeaderType.SUPPORTED_PLATFORM: lambda: native(),
    HeaderType.GUEST_POLICY: lambda: native(inits=(SNP_POLICY,), platforms=(SNP,)),
    HeaderType.RELOCATABLE_REGION: lambda: native(VBS_VP, inits=(H.RelocatableRegion(
        compatibility_mask=2, relocation_alignment=0x200000, relocation_region_gpa=0x200000,
        relocation_region_size=0x200000, minimum_relocation_gpa=0x200000, maximum_relocation_gpa=0x1000_0000),),
        platforms=(VBS,)),
    HeaderType.PAGE_TABLE_RELOCATION_REGION: lambda: native(VBS_VP, inits=(H.PageTableRelocation(
        compatibility_mask=2, gpa=0x30_0000, size=0x1_0000, used_size=PAGE),), platforms=(VBS,)),
    HeaderType.CORIM_DOCUMENT: lambda: native(inits=(H.CorimDocument(compatibility_mask=1, data=b"corim" * 4),)),
    HeaderType.CORIM_SIGNATURE: lambda: native(inits=(H.CorimDocument(compatibility_mask=1, data=b"corim" * 4),
                                                      H.CorimSignature(compatibility_mask=1, data=b"sig" * 8))),
    HeaderType.CCA_POLICY: lambda: IgvmFile(  # CCA exists only on AArch64: no NATIVE platform there
        revision=2, architecture=Architecture.AARCH64,
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.CCA),),
        initializations=(H.CcaPolicy(compatibility_mask=1),),
        directives=(H.PageData(gpa=0x4000_0000, compatibility_mask=1, data=bytes(PAGE)),)),
    HeaderType.PARAMETER_AREA: lambda: native(AREA),
    HeaderType.PAGE_DATA: lambda: native(H.PageData(gpa=0x10_0000, compatibility_mask=1, data=b"data")),
    HeaderType.PARAMETER_INSERT: lambda: native(AREA, INSERT),
    HeaderType.VP_CONTEXT: lambda: IgvmFile(platforms=(NATIVE,), directives=(GDT, CODE, VP)),
    HeaderType.REQUIRED_MEMORY: lambda: native(H.RequiredMemory(gpa=0x10_0000, compatibility_mask=1,
                                                                number_of_bytes=0x10_0000)),
    HeaderType.SNP_ID_BLOCK: lambda: native(H.SnpIdBlock(compatibility_mask=2, ld=bytes(48)), inits=(SNP_POLICY,),
                                            platforms=(SNP,)),
    HeaderType.ERROR_RANGE: lambda: native(H.ErrorRange(gpa=0x10_0000, compatibility_mask=1, size_bytes=PAGE)),
    HeaderType.VBS_MEASUREMENT: lambda: native(H.VbsMeasurement(compatibility_mask=2), platforms=(VBS,)),
    **{t: _usage(kind) for t, kind in H.PARAMETER_USAGES.items()},
}


def test_every_header_type_has_a_file() -> None:
    unused = {HeaderType.INVALID, HeaderType.RESERVED_DO_NOT_USE}
    assert set(FILES) == set(HeaderType) - unused


def qemu_findings(f: IgvmFile, guest: str) -> list[Finding]:
    return [Finding(*issue) for issue in _qemu_findings(f, guest)]


def _errors(findings: list[Finding]) -> list[str]:
    return [fd.message for fd in findings if fd.severity == "error"]


@pytest.mark.parametrize("header", sorted(FILES), ids=lambda t: t.name)
def test_lint_errs_exactly_when_qemu_refuses_the_header(tmp_path: Path, header: HeaderType) -> None:
    f = FILES[header]()
    path = tmp_path / f"{header.name}.igvm"
    path.write_bytes(f.to_bytes())
    f = IgvmFile.load(path)
    assert any(int(h.TYPE) == header for h in f.headers)
    outcome = launch(path)
    errors = _errors(lint(f, "qemu", qemu_guest="none"))
    assert bool(errors) == (not outcome.loaded), (outcome.message, errors)
    if not outcome.loaded:
        assert any(header.name in e for e in errors), (outcome.message, errors)
        # QEMU names what stopped it: the type it has no handler for, or the parse (libigvm 0.4.0)
        assert f"(type 0x{int(header):X})" in outcome.message or "Unable to parse IGVM file" in outcome.message
    assert (header in QEMU_HANDLED) == outcome.loaded


def _snp_only() -> IgvmFile:
    return IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),),
                    initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),),
                    directives=(H.PageData(gpa=0xFFFF_F000, compatibility_mask=1, data=RESET.data),))


def _tdx_only() -> IgvmFile:
    return IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.TDX,
                                                   shared_gpa_boundary=1 << 47),),
                    directives=(H.PageData(gpa=0xFFFF_F000, compatibility_mask=1, data=RESET.data),))


def _snp_tdx() -> IgvmFile:
    return IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.SEV_SNP),
                               H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.TDX,
                                                   shared_gpa_boundary=1 << 47)),
                    initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),),
                    directives=(H.PageData(gpa=0xFFFF_F000, compatibility_mask=3, data=RESET.data),))


def _native_snp_tdx() -> IgvmFile:
    return IgvmFile(platforms=(NATIVE, H.SupportedPlatform(compatibility_mask=2, platform_type=PlatformType.SEV_SNP),
                               H.SupportedPlatform(compatibility_mask=4, platform_type=PlatformType.TDX,
                                                   shared_gpa_boundary=1 << 47)),
                    initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=2),),
                    directives=(H.PageData(gpa=0xFFFF_F000, compatibility_mask=7, data=RESET.data),))


PLATFORM_FILES: dict[str, Callable[[], IgvmFile]] = {
    "native": lambda: native(), "snp": _snp_only, "tdx": _tdx_only, "snp+tdx": _snp_tdx,
    "native+snp+tdx": _native_snp_tdx,
}


@pytest.mark.parametrize("name", sorted(PLATFORM_FILES))
def test_lint_says_when_qemu_has_no_platform_to_start(tmp_path: Path, name: str) -> None:
    path = tmp_path / "f.igvm"
    path.write_bytes(PLATFORM_FILES[name]().to_bytes())
    f = IgvmFile.load(path)
    outcome = launch(path)
    errors = _errors(lint(f, "qemu", qemu_guest="none"))
    assert outcome.loaded == ("native" in name)
    assert bool(errors) == (not outcome.loaded), (outcome.message, errors)
    if not outcome.loaded:
        assert outcome.message.endswith(REFUSED_PLATFORM)
        assert any(REFUSED_PLATFORM in e for e in errors)
        # without --qemu-guest lint only warns when an SEV host could start it
        default = lint(f, "qemu")
        assert bool(_errors(default)) == ("snp" not in name)


def test_an_snp_and_tdx_ovmf_build_is_refused_without_sev(tmp_path: Path) -> None:
    """The issue's case: an OVMF image built for SNP and TDX only."""
    body = f'[image]\nplatforms = ["snp", "tdx"]\n[firmware]\npath = {q(OVMF_BOOKWORM)}\n'
    path = tmp_path / "ovmf.igvm"
    path.write_bytes(build_bytes(config(tmp_path, body)))
    outcome = launch(path)
    assert not outcome.loaded and outcome.message.endswith(REFUSED_PLATFORM)
    f = IgvmFile.load(path)
    assert any(REFUSED_PLATFORM in e for e in _errors(lint(f, "qemu", qemu_guest="none")))
    assert not [e for e in _errors(qemu_findings(f, "sev-snp"))]


def test_confidential_guest_rules_from_source() -> None:
    """What QEMU 10.2.2 starts with each confidential-guest object (read from its source: these
    launches need SEV or TDX hardware)."""
    snp_tdx = _snp_tdx()
    assert not _errors(qemu_findings(snp_tdx, "sev-snp"))
    assert any("SEV_SNP platform" in fd.message and "TDX is ignored" in fd.message
               for fd in qemu_findings(snp_tdx, "sev-snp"))
    assert _errors(qemu_findings(snp_tdx, "sev"))  # a sev-guest object starts no SEV-SNP platform
    for f in (snp_tdx, _tdx_only(), native()):  # no TDX support in the IGVM loader at all
        assert any("no TDX support" in e for e in _errors(qemu_findings(f, "tdx")))
    warned = qemu_findings(native(), "sev-snp")
    assert not _errors(warned) and any("not a confidential launch" in fd.message for fd in warned)


def test_a_file_without_directives_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.igvm"
    path.write_bytes(IgvmFile(platforms=(NATIVE,)).to_bytes())
    outcome = launch(path)
    assert not outcome.loaded and "Invalid directive header count" in outcome.message
    assert any("no directive headers" in e for e in _errors(lint(IgvmFile.load(path), "qemu", qemu_guest="none")))


def loads_paused(path: Path) -> Outcome:
    """QEMU paused before the first instruction (``-S``), told to quit on its monitor: it reads the
    monitor only after loading the file, so exit 0 means loaded and 1 refused; no guest code runs,
    so any image works (here real builds whose guests would run on)."""
    argv = [str(qemu_binary()), "-machine", "q35,igvm-cfg=igvm0", "-object", f"igvm-cfg,id=igvm0,file={path}",
            "-display", "none", "-serial", "none", "-nic", "none", "-m", "512", "-accel", "tcg", "-S",
            "-monitor", "stdio"]
    try:
        proc = subprocess.run(argv, input="quit\n", capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"QEMU did not quit within 60 s: {exc}", pytrace=False)
    if proc.returncode == 0:
        return Outcome(True, "")
    if proc.returncode == 1 and proc.stderr.startswith("qemu-system-x86_64: "):
        return Outcome(False, proc.stderr.strip())
    pytest.fail(f"unexpected QEMU exit status {proc.returncode}: {proc.stderr}", pytrace=False)


def _kernel(path: Path, platforms: str) -> str:
    return f'[image]\nplatforms = [{platforms}]\n[kernel]\npath = {q(path)}\ncmdline = "console=ttyS0"\n'


#: Real builds: (config, whether QEMU 10.2.2 without a confidential-guest object loads the file).
REAL_BUILDS: dict[str, tuple[str, bool]] = {
    "ovmf-native-snp-tdx": (f'[image]\nplatforms = ["native", "snp", "tdx"]\n[firmware]\npath = {q(OVMF_BOOKWORM)}\n',
                            True),
    "ovmf-snp-tdx": (f'[image]\nplatforms = ["snp", "tdx"]\n[firmware]\npath = {q(OVMF_BOOKWORM)}\n', False),
    "vmlinuz-native-snp-tdx": (_kernel(VMLINUZ, '"native", "snp", "tdx"'), True),
    "ipxe-native-sev-sev-es": (_kernel(IPXE, '"native", "sev", "sev-es"'), True),
    "grub-pvh-native": (_kernel(GRUB, '"native"'), True),
    # a VBS platform brings a VBS_MEASUREMENT header, which QEMU refuses whatever its mask
    "memtest-all-six": (_kernel(MEMTEST, '"native", "snp", "tdx", "vbs", "sev", "sev-es"'), False),
    "uboot-native-vbs": (_kernel(UBOOT, '"native", "vbs"'), False),
}


@pytest.mark.parametrize("name", sorted(REAL_BUILDS))
def test_lint_agrees_with_qemu_on_real_builds(tmp_path: Path, name: str) -> None:
    body, loads = REAL_BUILDS[name]
    path = tmp_path / f"{name}.igvm"
    path.write_bytes(build_bytes(config(tmp_path, body)))
    outcome = loads_paused(path)
    assert outcome.loaded == loads, outcome.message
    errors = _errors(lint(IgvmFile.load(path), "qemu", qemu_guest="none"))
    assert bool(errors) == (not outcome.loaded), (outcome.message, errors)
    if "VBS_MEASUREMENT" in outcome.message or "(type 0x311)" in outcome.message:
        assert any("VBS_MEASUREMENT" in e for e in errors)


@pytest.mark.parametrize("platforms", ['"native", "sev", "sev-es"', '"snp", "sev-es"'])
def test_kvm_snp_vmsa_rules_apply_to_snp_vmsas_only(tmp_path: Path, platforms: str) -> None:
    """The KVM SEV-SNP VMSA checks (refusals, changed fields, differing sev_features) concern the
    VMSAs of the SEV-SNP platform: an SEV-ES VMSA (sev_features 0, as SEV-ES wants) is not an SNP
    VMSA lacking the SNP bit."""
    path = tmp_path / "image.igvm"
    path.write_bytes(build_bytes(config(tmp_path, _kernel(MEMTEST, platforms))))
    f = IgvmFile.load(path)
    sev_es = f.platform(PlatformType.SEV_ES)
    assert sev_es is not None
    assert any(isinstance(h, H.SnpVpContext) and h.compatibility_mask & sev_es.compatibility_mask
               for h in f.directives)
    messages = [x.message for x in lint(f, "qemu")]
    assert not [m for m in messages if "lacks SNP" in m], messages
    assert not [m for m in messages if "different sev_features" in m], messages
