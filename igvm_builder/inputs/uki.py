"""Unified Kernel Images: a PE/COFF EFI stub carrying ``.linux``, ``.initrd``, ``.cmdline``, ...

The UKI specification (uapi-group.org, "Unified Kernel Image") defines the section names.
All a UKI needs of the PE format is the section table, which
:func:`igvm_builder.inputs.blob.pe_sections` reads (headers checked: PE32/PE32+ optional
header, the table inside the file); sections are then cut from the input without a copy of it.

Section contents are cut from the input bytes at ``PointerToRawData``, ``VirtualSize`` bytes
long (the raw data is padded to the file alignment; the virtual size is the real payload
length, as systemd-stub reads it); a ``VirtualSize`` larger than the raw data is rejected.

Multi-profile UKIs (``.profile`` sections): sections before the first ``.profile`` are the
base; a profile's sections replace base sections of the same name.  ``profile=0`` (what
systemd-stub boots by default) applies the first profile, if any.
"""

from __future__ import annotations

import struct

from igvm_builder.errors import InputError
from igvm_builder.inputs.blob import pe_sections
from igvm_builder.recordclass import field, record

__all__ = ["UKI_SECTIONS", "Uki", "parse_uki"]

#: Section names defined by the UKI specification.
UKI_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".dtbauto",
                ".hwids", ".uname", ".sbat", ".pcrsig", ".pcrpkey", ".profile", ".efifw")


@record(kw_only=True)
class UkiSection:
    """A PE section's location and payload length within the file."""

    name: str
    offset: int
    raw_size: int
    virtual_size: int

    @property
    def size(self) -> int:
        """Payload length: ``VirtualSize``, or ``SizeOfRawData`` if that is 0."""
        return self.virtual_size or self.raw_size


@record(kw_only=True)
class Uki:
    """The payloads of a UKI (``None`` where the section is absent).

    Attributes:
        name: File name for error messages.
        linux: The ``.linux`` section: the kernel (normally a bzImage with EFI stub).
        initrd: ``.initrd``.
        cmdline: ``.cmdline`` decoded as UTF-8, trailing NUL bytes removed.
        osrel: ``.osrel`` (os-release text).
        uname: ``.uname`` (the kernel release string).
        ucode: ``.ucode`` (an early-microcode cpio systemd-stub puts before the initrd).
        sbat: ``.sbat`` text.
        profiles: Number of ``.profile`` sections (0 for a classic single-profile UKI).
        section_names: Every section name, in file order.
    """

    name: str
    linux: bytes = field(repr=False)
    initrd: bytes | None = field(repr=False)
    cmdline: str | None
    osrel: str | None
    uname: str | None
    ucode: bytes | None = field(repr=False)
    sbat: str | None
    profiles: int
    section_names: tuple[str, ...]


def _parse_pe(view: memoryview, name: str) -> list[UkiSection]:
    """The section table of a PE file, or InputError."""
    table = pe_sections(view)
    if table is None:
        raise InputError("not a UKI: no PE/COFF header ('MZ' and 'PE\\0\\0')", source=name)
    if table.problem is not None:
        raise InputError(f"not a valid PE/COFF file: {table.problem}", source=name)
    return [UkiSection(name=s.name, offset=s.raw_offset, raw_size=s.raw_size, virtual_size=s.virtual_size)
            for s in table.sections]


def _select_profile(sections: list[UkiSection], profile: int, name: str) -> dict[str, UkiSection]:
    groups: list[list[UkiSection]] = [[]]
    for sec in sections:
        if sec.name == ".profile":
            groups.append([])
        groups[-1].append(sec)
    chosen: dict[str, UkiSection] = {}
    for sec in groups[0]:
        chosen.setdefault(sec.name, sec)
    if len(groups) > 1:
        if not 0 <= profile < len(groups) - 1:
            raise InputError(f"UKI has {len(groups) - 1} profiles, no profile {profile}", source=name)
        override: dict[str, UkiSection] = {}
        for sec in groups[profile + 1]:
            override.setdefault(sec.name, sec)
        chosen.update(override)
    elif profile != 0:
        raise InputError(f"UKI has no profiles, cannot select profile {profile}", source=name)
    return chosen


def _text(raw: bytes | None, section: str, name: str) -> str | None:
    if raw is None:
        return None
    try:
        return raw.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"UKI section {section} is not UTF-8 text: {exc}", source=name) from exc


def parse_uki(data: bytes | bytearray | memoryview, name: str, *, profile: int = 0) -> Uki:
    """Extract the kernel, initrd, command line and metadata from a UKI.

    Args:
        data: The whole file.
        name: File name for error messages.
        profile: Which profile of a multi-profile UKI to use (the default profile is 0).

    Raises:
        InputError: not a PE file, no ``.linux`` section (or an empty one), a section extends
            beyond the end of the file, a text section is not UTF-8, no such profile.
    """
    view = memoryview(data).cast("B").toreadonly()
    if len(view) >= 0x40 and bytes(view[:2]) == b"MZ":
        (pe_off,) = struct.unpack_from("<I", view, 0x3C)
        if pe_off + 24 > len(view):
            raise InputError(f"truncated PE file: the PE header at {pe_off:#x} is beyond the end "
                             f"({len(view):#x} bytes)", source=name)
    sections = _parse_pe(view, name)
    chosen = _select_profile(sections, profile, name)
    if ".linux" not in chosen:
        raise InputError("not a UKI: PE file has no .linux section", source=name)

    def payload(section: str) -> bytes | None:
        sec = chosen.get(section)
        if sec is None:
            return None
        if sec.size > sec.raw_size:
            raise InputError(
                f"UKI section {section}: VirtualSize {sec.virtual_size:#x} exceeds the "
                f"{sec.raw_size:#x} bytes of raw data in the file", source=name, offset=sec.offset)
        if sec.offset + sec.size > len(view):
            raise InputError(
                f"UKI section {section} ({sec.size:#x} bytes at file offset {sec.offset:#x}) extends "
                f"beyond the end of the file ({len(view):#x} bytes)", source=name, offset=sec.offset)
        return bytes(view[sec.offset : sec.offset + sec.size])

    linux = payload(".linux")
    if not linux:
        raise InputError("UKI .linux section is empty", source=name)
    return Uki(
        name=name,
        linux=linux,
        initrd=payload(".initrd"),
        cmdline=_text(payload(".cmdline"), ".cmdline", name),
        osrel=_text(payload(".osrel"), ".osrel", name),
        uname=_text(payload(".uname"), ".uname", name),
        ucode=payload(".ucode"),
        sbat=_text(payload(".sbat"), ".sbat", name),
        profiles=sum(1 for sec in sections if sec.name == ".profile"),
        section_names=tuple(sec.name for sec in sections),
    )
