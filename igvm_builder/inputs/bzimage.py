"""Linux x86 bzImages: the boot-protocol setup header, the zero page (boot_params) and e820.

References: the Linux kernel's ``Documentation/arch/x86/boot.rst`` (the boot protocol, setup
header offsets 0x1f1-0x26b) and ``Documentation/arch/x86/zero-page.rst`` (``struct
boot_params``), ``arch/x86/include/uapi/asm/bootparam.h``.  All offsets below are file offsets
(for the setup header) or offsets into the 4 KiB zero page; every multi-byte field is
little-endian.

A bzImage is ``(setup_sects + 1) * 512`` bytes of real-mode setup (boot sector + setup code,
with the setup header at 0x1f1) followed by the protected-mode kernel.  For a direct boot
the loader copies only the protected-mode kernel into guest memory (at ``pref_address`` for
a non-relocatable kernel, else any ``kernel_alignment``-aligned address), builds a zero page
with :func:`build_boot_params`, and enters at the load address (32-bit protocol) or the load
address + 0x200 (64-bit protocol, ``XLF_KERNEL_64``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import ClassVar

from igvm_builder.errors import InputError, LayoutError
from igvm_builder.recordclass import field, record

__all__ = [
    "BOOT_PARAMS_SIZE",
    "CAN_USE_HEAP",
    "E820_ACPI",
    "E820_MAX_ENTRIES_ZEROPAGE",
    "E820_NVS",
    "E820_PMEM",
    "E820_PRAM",
    "E820_RAM",
    "E820_RESERVED",
    "E820_UNUSABLE",
    "KEEP_SEGMENTS",
    "KERNEL_64_ENTRY_OFFSET",
    "LOADED_HIGH",
    "LOADER_TYPE_UNDEFINED",
    "MIN_PROTOCOL",
    "QUIET_FLAG",
    "XLF_5LEVEL",
    "XLF_5LEVEL_ENABLED",
    "XLF_CAN_BE_LOADED_ABOVE_4G",
    "XLF_EFI_HANDOVER_32",
    "XLF_EFI_HANDOVER_64",
    "XLF_EFI_KEXEC",
    "XLF_KERNEL_64",
    "BzImage",
    "E820Entry",
    "build_boot_params",
    "parse_bzimage",
]

# -- loadflags (setup header 0x211) -------------------------------------------------------
LOADED_HIGH = 0x01  # protected-mode code is loaded at 0x100000 (bzImage); set by the kernel
KASLR_FLAG = 0x02  # set by the kernel itself, internal
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40  # obsolete (32-bit protocol only; ignored since Linux 5.x)
CAN_USE_HEAP = 0x80  # heap_end_ptr is valid (only the real-mode setup code uses the heap)

# -- xloadflags (setup header 0x236, protocol 2.12+) --------------------------------------
XLF_KERNEL_64 = 1 << 0  # 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1  # kernel/boot_params/cmdline/ramdisk may be above 4 GiB
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

# -- e820 types (arch/x86/include/asm/e820/types.h) ---------------------------------------
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
E820_PMEM = 7
E820_PRAM = 12

E820_MAX_ENTRIES_ZEROPAGE = 128
BOOT_PARAMS_SIZE = 4096
KERNEL_64_ENTRY_OFFSET = 0x200
LOADER_TYPE_UNDEFINED = 0xFF
#: Oldest protocol accepted: 2.06 adds cmdline_size (2.05 relocatable_kernel, 2.03
#: initrd_addr_max), which a loader needs to place things without guessing.
MIN_PROTOCOL = 0x0206

_HDR_START = 0x1F1
_HDR_MAGIC = b"HdrS"
_BOOT_FLAG = 0xAA55
_DEFAULT_LOAD_ADDRESS = 0x100000  # LOADED_HIGH kernels before protocol 2.10 (no pref_address)
_ZP_LIMIT = 0x290  # first zero-page field after the setup header (edd_mbr_sig_buffer)

# -- zero page (struct boot_params) offsets ------------------------------------------------
_BP_ACPI_RSDP_ADDR = 0x070  # u64
_BP_EXT_RAMDISK_IMAGE = 0x0C0  # u32
_BP_EXT_RAMDISK_SIZE = 0x0C4  # u32
_BP_EXT_CMD_LINE_PTR = 0x0C8  # u32
_BP_CC_BLOB_ADDRESS = 0x13C  # u32 (SEV-SNP: struct cc_blob_sev_info, Linux 5.19+)
_BP_E820_ENTRIES = 0x1E8  # u8
_BP_TYPE_OF_LOADER = 0x210  # u8
_BP_LOADFLAGS = 0x211  # u8
_BP_RAMDISK_IMAGE = 0x218  # u32
_BP_RAMDISK_SIZE = 0x21C  # u32
_BP_CMD_LINE_PTR = 0x228  # u32
_BP_SETUP_DATA = 0x250  # u64 (protocol 2.09+)
_BP_E820_TABLE = 0x2D0  # struct boot_e820_entry[128]

# Setup header fields: (name, file offset, struct format, first protocol version with it).
_HDR_FIELDS: tuple[tuple[str, int, str, int], ...] = (
    ("setup_sects", 0x1F1, "B", 0),
    ("root_flags", 0x1F2, "H", 0),
    ("syssize", 0x1F4, "I", 0x0204),
    ("ram_size", 0x1F8, "H", 0),
    ("vid_mode", 0x1FA, "H", 0),
    ("root_dev", 0x1FC, "H", 0),
    ("boot_flag", 0x1FE, "H", 0),
    ("jump", 0x200, "H", 0x0200),
    ("header", 0x202, "I", 0x0200),
    ("version", 0x206, "H", 0x0200),
    ("realmode_swtch", 0x208, "I", 0x0200),
    ("start_sys_seg", 0x20C, "H", 0x0200),
    ("kernel_version", 0x20E, "H", 0x0200),
    ("type_of_loader", 0x210, "B", 0x0200),
    ("loadflags", 0x211, "B", 0x0200),
    ("setup_move_size", 0x212, "H", 0x0200),
    ("code32_start", 0x214, "I", 0x0200),
    ("ramdisk_image", 0x218, "I", 0x0200),
    ("ramdisk_size", 0x21C, "I", 0x0200),
    ("bootsect_kludge", 0x220, "I", 0x0200),
    ("heap_end_ptr", 0x224, "H", 0x0201),
    ("ext_loader_ver", 0x226, "B", 0x0202),
    ("ext_loader_type", 0x227, "B", 0x0202),
    ("cmd_line_ptr", 0x228, "I", 0x0202),
    ("initrd_addr_max", 0x22C, "I", 0x0203),
    ("kernel_alignment", 0x230, "I", 0x0205),
    ("relocatable_kernel", 0x234, "B", 0x0205),
    ("min_alignment", 0x235, "B", 0x020A),
    ("xloadflags", 0x236, "H", 0x020C),
    ("cmdline_size", 0x238, "I", 0x0206),
    ("hardware_subarch", 0x23C, "I", 0x0207),
    ("hardware_subarch_data", 0x240, "Q", 0x0207),
    ("payload_offset", 0x248, "I", 0x0208),
    ("payload_length", 0x24C, "I", 0x0208),
    ("setup_data", 0x250, "Q", 0x0209),
    ("pref_address", 0x258, "Q", 0x020A),
    ("init_size", 0x260, "I", 0x020A),
    ("handover_offset", 0x264, "I", 0x020B),
    ("kernel_info_offset", 0x268, "I", 0x020F),
)
_HDR_END = 0x26C  # end of struct setup_header as of protocol 2.15


@record
class E820Entry:
    """``struct boot_e820_entry``: ``<QQI`` (addr, size, type), 20 bytes, packed."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQI")
    SIZE: ClassVar[int] = 20

    addr: int
    size: int
    type: int

    def __post_init__(self) -> None:
        if not 0 <= self.addr < 1 << 64 or not 0 < self.size < 1 << 64 or self.addr + self.size > 1 << 64:
            raise LayoutError(f"e820 range {self.addr:#x}+{self.size:#x} is empty or outside 64 bits")
        if not 0 < self.type < 1 << 32:
            raise LayoutError(f"e820 type {self.type} is not a valid u32 type")

    def pack(self) -> bytes:
        """The 20-byte entry."""
        return self.STRUCT.pack(self.addr, self.size, self.type)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, offset: int = 0) -> E820Entry:
        """Decode one entry at ``offset``."""
        return cls(*cls.STRUCT.unpack_from(buf, offset))


if E820Entry.STRUCT.size != E820Entry.SIZE:
    raise ImportError("E820Entry layout does not match struct boot_e820_entry (20 bytes)")


@record(kw_only=True)
class BzImage:
    """A parsed bzImage.

    Header fields a protocol version does not define read as 0 (``syssize`` before 2.04,
    ``xloadflags`` before 2.12, ``pref_address``/``init_size`` before 2.10, ...).  Field names
    are those of ``struct setup_header``; ``version`` is ``0x020f`` for protocol 2.15.

    Attributes:
        name: File name for error messages.
        setup_sects: As in the file (0 means 4; see ``setup_size``).
        setup_size: Bytes of real-mode setup, ``(setup_sects or 4) + 1`` sectors of 512.
        setup: View of the real-mode part (``data[:setup_size]``).
        kernel: View of the protected-mode kernel (``data[setup_size:]``), what a loader
            copies to the load address.  A slice of the caller's buffer, not a copy.
        header: The setup header bytes as the protocol says to copy them into the zero page:
            file offsets 0x1f1 up to ``0x202 + data[0x201]`` (capped at 0x290).
        efi_stub: The image is also a PE/COFF (``MZ`` + ``PE\\0\\0``) EFI application.
    """

    name: str
    setup_sects: int
    setup_size: int
    setup: memoryview
    kernel: memoryview
    header: bytes = field(repr=False)
    efi_stub: bool
    root_flags: int
    syssize: int
    vid_mode: int
    boot_flag: int
    version: int
    kernel_version: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int

    @property
    def protocol(self) -> tuple[int, int]:
        """The boot protocol version as ``(major, minor)``, e.g. ``(2, 15)``."""
        return self.version >> 8, self.version & 0xFF

    @property
    def relocatable(self) -> bool:
        """``relocatable_kernel`` is set: any suitably aligned load address works."""
        return self.relocatable_kernel != 0

    @property
    def supports_64bit_entry(self) -> bool:
        """``XLF_KERNEL_64``: a 64-bit entry point at load address + 0x200."""
        return bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def can_be_loaded_above_4g(self) -> bool:
        """``XLF_CAN_BE_LOADED_ABOVE_4G``: kernel, zero page, cmdline and initrd may sit above 4 GiB."""
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    @property
    def load_alignment(self) -> int:
        """Alignment a relocatable kernel's load address needs.

        ``1 << min_alignment`` when the protocol defines it (2.10+), else ``kernel_alignment``.
        """
        if self.version >= 0x020A and self.min_alignment:
            return 1 << self.min_alignment
        return self.kernel_alignment or 1

    @property
    def default_load_address(self) -> int:
        """``pref_address`` (2.10+), else 0x100000 (where a ``LOADED_HIGH`` kernel goes)."""
        return self.pref_address if self.pref_address else _DEFAULT_LOAD_ADDRESS

    @property
    def memory_footprint(self) -> int:
        """Bytes needed from the load address before the kernel reads its memory map.

        ``init_size`` (2.10+), else the size of the protected-mode kernel (a lower bound).
        """
        return max(self.init_size, len(self.kernel))

    def entry_point(self, load_address: int, *, mode64: bool = True) -> int:
        """The entry GPA: ``load_address + 0x200`` (64-bit) or ``load_address`` (32-bit)."""
        if mode64:
            if not self.supports_64bit_entry:
                raise InputError("kernel has no 64-bit entry point (XLF_KERNEL_64 not set)",
                                 source=self.name)
            return load_address + KERNEL_64_ENTRY_OFFSET
        return load_address

    def check_load_address(self, load_address: int) -> None:
        """Raise LayoutError unless the kernel may be loaded (and run) at ``load_address``."""
        if self.relocatable:
            if load_address % self.load_alignment:
                raise LayoutError(
                    f"load address {load_address:#x} is not aligned to {self.load_alignment:#x}",
                    source=self.name, gpa=load_address)
        elif load_address != self.default_load_address:
            raise LayoutError(
                f"kernel is not relocatable and must be loaded at {self.default_load_address:#x}",
                source=self.name, gpa=load_address)
        if load_address + self.memory_footprint > 1 << 32 and not self.can_be_loaded_above_4g:
            raise LayoutError("kernel cannot be loaded above 4 GiB (no XLF_CAN_BE_LOADED_ABOVE_4G)",
                              source=self.name, gpa=load_address)


def _proto(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def _u(buf: memoryview, offset: int, fmt: str) -> int:
    value: int = struct.unpack_from("<" + fmt, buf, offset)[0]
    return value


def parse_bzimage(
    data: bytes | bytearray | memoryview,
    name: str,
    *,
    require_64bit: bool = False,
    require_relocatable: bool = False,
) -> BzImage:
    """Parse a bzImage's setup header.

    Args:
        data: The whole file.  ``setup`` and ``kernel`` are views into it.
        name: File name for error messages.
        require_64bit: Reject kernels without the 64-bit entry point (``XLF_KERNEL_64``).
        require_relocatable: Reject kernels with ``relocatable_kernel == 0``.

    Raises:
        InputError: no ``0xaa55`` boot flag or ``HdrS`` magic, protocol older than 2.06, not a
            bzImage (``LOADED_HIGH`` clear), truncated (file shorter than the setup or than
            ``syssize`` says), or a requirement above not met.
    """
    view = memoryview(data).cast("B").toreadonly()
    if len(view) < 0x206:
        raise InputError(f"too short for a Linux boot-protocol header ({len(view)} bytes)", source=name)
    if bytes(view[0x202:0x206]) != _HDR_MAGIC or _u(view, 0x1FE, "H") != _BOOT_FLAG:
        raise InputError("not a Linux bzImage (no 0xaa55 boot flag and 'HdrS' magic at 0x1fe/0x202)",
                         source=name)
    version = _u(view, 0x206, "H")
    if version < MIN_PROTOCOL:
        raise InputError(
            f"boot protocol {_proto(version)} is too old (need 2.06 or later)",
            source=name, offset=0x206)
    # boot.rst: the header ends at 0x202 + the short jump's displacement at 0x201
    if view[0x200] == 0xEB:
        hdr_end = min(0x202 + view[0x201], _ZP_LIMIT)
    else:
        hdr_end = max((off + struct.calcsize(fmt) for _, off, fmt, since in _HDR_FIELDS
                       if version >= since), default=0x206)
    if len(view) < max(hdr_end, _HDR_END):
        raise InputError("truncated setup header", source=name)

    fields = {fname: (_u(view, off, fmt) if version >= since else 0)
              for fname, off, fmt, since in _HDR_FIELDS}
    if not fields["loadflags"] & LOADED_HIGH:
        raise InputError("zImage (LOADED_HIGH clear): only bzImages are supported", source=name,
                         offset=0x211)

    setup_sects = fields["setup_sects"] or 4
    setup_size = (setup_sects + 1) * 512
    if len(view) <= setup_size:
        raise InputError(
            f"truncated: file has {len(view):#x} bytes, the real-mode setup alone is {setup_size:#x}",
            source=name)
    kernel = view[setup_size:]
    syssize = fields["syssize"]
    if syssize and len(kernel) + 15 < syssize * 16:
        raise InputError(
            f"truncated: protected-mode kernel has {len(kernel):#x} bytes, syssize says "
            f"{syssize * 16:#x}", source=name)

    if require_64bit and not fields["xloadflags"] & XLF_KERNEL_64:
        raise InputError(
            f"kernel has no 64-bit entry point (protocol {_proto(version)}, "
            f"xloadflags {fields['xloadflags']:#x} lacks XLF_KERNEL_64)", source=name, offset=0x236)
    if require_relocatable and not fields["relocatable_kernel"]:
        raise InputError("kernel is not relocatable (relocatable_kernel is 0)", source=name,
                         offset=0x234)

    efi_stub = False
    if bytes(view[:2]) == b"MZ":
        pe_off = _u(view, 0x3C, "I")
        efi_stub = pe_off + 4 <= len(view) and bytes(view[pe_off : pe_off + 4]) == b"PE\0\0"

    passthrough = ("root_flags", "syssize", "vid_mode", "boot_flag", "version", "kernel_version",
                   "loadflags", "code32_start", "initrd_addr_max", "kernel_alignment",
                   "relocatable_kernel", "min_alignment", "xloadflags", "cmdline_size",
                   "hardware_subarch", "payload_offset", "payload_length", "setup_data",
                   "pref_address", "init_size", "handover_offset", "kernel_info_offset")
    return BzImage(
        name=name,
        setup_sects=fields["setup_sects"],
        setup_size=setup_size,
        setup=view[:setup_size],
        kernel=kernel,
        header=bytes(view[_HDR_START:hdr_end]),
        efi_stub=efi_stub,
        **{key: fields[key] for key in passthrough},
    )


# -- SEV-SNP: the Confidential Computing blob (Linux arch/x86/include/asm/sev.h, setup_data.h) -
#: ``struct setup_data`` type of a node carrying the GPA of a ``struct cc_blob_sev_info``.
SETUP_CC_BLOB = 7
CC_BLOB_SEV_HDR_MAGIC = 0x45444D41  # "AMDE"
CC_BLOB_VERSION = 1  # what OVMF writes (Linux checks only the magic)
_SETUP_DATA = struct.Struct("<QII")  # next, type, len (then len bytes of data)
_CC_BLOB_SEV_INFO = struct.Struct("<IHHQIIQII")  # magic, version, reserved, secrets (phys, len, rsvd), cpuid (...)
#: Where :func:`snp_cc_blob_page` puts the ``cc_blob_sev_info`` in its page.
CC_BLOB_OFFSET = 0x20


def snp_cc_blob_page(page_gpa: int, *, secrets_gpa: int, cpuid_gpa: int, with_setup_data: bool = True) -> bytes:
    """The page at ``page_gpa`` through which a directly booted Linux finds its SEV-SNP secrets
    and CPUID pages (each 4 KiB).

    Linux's SNP start-up code looks for a ``struct cc_blob_sev_info`` in the EFI configuration
    table and, without EFI, in a ``setup_data`` node of type :data:`SETUP_CC_BLOB` whose data is
    the blob's 32-bit GPA; with SNP active and no blob it stops.  The page holds that node at
    offset 0 (point ``boot_params.hdr.setup_data`` at ``page_gpa``; protocol 2.09+) and the blob
    at :data:`CC_BLOB_OFFSET` (also the value for ``boot_params.cc_blob_address``).  With
    ``with_setup_data=False`` (older boot protocols) only the blob is written.
    """
    blob_gpa = page_gpa + CC_BLOB_OFFSET
    if not 0 <= blob_gpa < 1 << 32 or not 0 <= secrets_gpa < 1 << 64 or not 0 <= cpuid_gpa < 1 << 64:
        raise LayoutError("the SEV CC blob must lie below 4 GiB (its address is a u32)", gpa=page_gpa)
    page = bytearray(4096)
    if with_setup_data:
        _SETUP_DATA.pack_into(page, 0, 0, SETUP_CC_BLOB, 4)
        struct.pack_into("<I", page, _SETUP_DATA.size, blob_gpa)
    _CC_BLOB_SEV_INFO.pack_into(page, CC_BLOB_OFFSET, CC_BLOB_SEV_HDR_MAGIC, CC_BLOB_VERSION, 0, secrets_gpa, 4096, 0,
                                cpuid_gpa, 4096, 0)
    return bytes(page)


def _split64(value: int) -> tuple[int, int]:
    return value & 0xFFFF_FFFF, value >> 32


def build_boot_params(
    bz: BzImage,
    *,
    cmdline_ptr: int,
    cmdline_size: int,
    initrd_addr: int,
    initrd_size: int,
    e820: Sequence[E820Entry],
    loader_type: int = LOADER_TYPE_UNDEFINED,
    acpi_rsdp_addr: int = 0,
    setup_data: int = 0,
    cc_blob_address: int = 0,
) -> bytes:
    """Build the 4 KiB zero page (``struct boot_params``) for a direct 32/64-bit boot.

    Everything not named here is zero, except the setup header, which is copied from the
    image (0x1f1 up to ``0x202 + data[0x201]``) as the boot protocol requires: the kernel's
    64-bit entry reads ``kernel_alignment`` and ``init_size`` from it.  ``loadflags`` stays as
    the image has it (``LOADED_HIGH``); ``CAN_USE_HEAP``/``heap_end_ptr`` matter only to the
    real-mode setup code, which a direct boot skips, and ``KEEP_SEGMENTS`` is obsolete.

    Args:
        bz: The parsed kernel.
        cmdline_ptr: GPA of the NUL-terminated command line, or 0 for none.
        cmdline_size: Length of the command line without its NUL; at most ``bz.cmdline_size``.
        initrd_addr: GPA of the initrd, or 0 with ``initrd_size == 0`` for none.
        initrd_size: Initrd length in bytes.
        e820: The memory map, at most 128 entries, written in the order given.
        loader_type: ``type_of_loader`` (0xff: undefined loader).
        acpi_rsdp_addr: ``acpi_rsdp_addr`` (0x070), 0 to let the kernel search for the RSDP.
        setup_data: GPA of the first ``struct setup_data`` (protocol 2.09+), or 0.
        cc_blob_address: GPA of the SEV-SNP ``struct cc_blob_sev_info`` (0x13c), or 0.

    Raises:
        LayoutError: too many e820 entries, command line too long, or a pointer the kernel
            cannot use (above 4 GiB without ``XLF_CAN_BE_LOADED_ABOVE_4G``, initrd ending
            above ``initrd_addr_max``, values that do not fit their fields).
    """
    src = bz.name
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LayoutError(f"{len(e820)} e820 entries; the zero page holds at most "
                          f"{E820_MAX_ENTRIES_ZEROPAGE}", source=src)
    if not 0 <= loader_type <= 0xFF:
        raise LayoutError(f"type_of_loader {loader_type:#x} does not fit in a byte", source=src)
    above_4g = bz.can_be_loaded_above_4g
    limit = 1 << 64 if above_4g else 1 << 32

    if cmdline_ptr:
        if not 0 <= cmdline_size <= bz.cmdline_size:
            raise LayoutError(f"command line is {cmdline_size} bytes; this kernel accepts at most "
                              f"{bz.cmdline_size}", source=src)
        if not 0 < cmdline_ptr or cmdline_ptr + cmdline_size + 1 > limit:
            raise LayoutError("command line must be below 4 GiB for this kernel" if not above_4g
                              else "command line address out of range", source=src, gpa=cmdline_ptr)
    elif cmdline_size:
        raise LayoutError("cmdline_size given without cmdline_ptr", source=src)

    if initrd_size:
        if initrd_addr <= 0 or initrd_size < 0 or initrd_size >= 1 << 64:
            raise LayoutError("initrd address/size out of range", source=src, gpa=initrd_addr)
        last = initrd_addr + initrd_size - 1
        if not above_4g and last > bz.initrd_addr_max:
            raise LayoutError(
                f"initrd ends at {last:#x}, above initrd_addr_max {bz.initrd_addr_max:#x}",
                source=src, gpa=initrd_addr)
        if last >= limit or initrd_size >= 1 << 64:
            raise LayoutError("initrd address out of range", source=src, gpa=initrd_addr)
    elif initrd_addr:
        raise LayoutError("initrd_addr given with initrd_size 0", source=src, gpa=initrd_addr)

    if setup_data and bz.version < 0x0209:
        raise LayoutError("setup_data needs boot protocol 2.09 or later", source=src)
    if not 0 <= setup_data < limit or not 0 <= acpi_rsdp_addr < 1 << 64:
        raise LayoutError("setup_data / acpi_rsdp_addr out of range", source=src)
    if not 0 <= cc_blob_address < 1 << 32:
        raise LayoutError("cc_blob_address must be below 4 GiB (a u32 field)", source=src,
                          gpa=cc_blob_address)

    zp = bytearray(BOOT_PARAMS_SIZE)
    zp[_HDR_START : _HDR_START + len(bz.header)] = bz.header
    zp[_BP_TYPE_OF_LOADER] = loader_type
    zp[_BP_LOADFLAGS] = bz.loadflags

    cmd_lo, cmd_hi = _split64(cmdline_ptr)
    rd_lo, rd_hi = _split64(initrd_addr)
    rds_lo, rds_hi = _split64(initrd_size)
    struct.pack_into("<I", zp, _BP_CMD_LINE_PTR, cmd_lo)
    struct.pack_into("<I", zp, _BP_EXT_CMD_LINE_PTR, cmd_hi)
    struct.pack_into("<I", zp, _BP_RAMDISK_IMAGE, rd_lo)
    struct.pack_into("<I", zp, _BP_RAMDISK_SIZE, rds_lo)
    struct.pack_into("<I", zp, _BP_EXT_RAMDISK_IMAGE, rd_hi)
    struct.pack_into("<I", zp, _BP_EXT_RAMDISK_SIZE, rds_hi)
    struct.pack_into("<Q", zp, _BP_ACPI_RSDP_ADDR, acpi_rsdp_addr)
    struct.pack_into("<I", zp, _BP_CC_BLOB_ADDRESS, cc_blob_address)
    if bz.version >= 0x0209:
        struct.pack_into("<Q", zp, _BP_SETUP_DATA, setup_data)

    zp[_BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820Entry.STRUCT.pack_into(zp, _BP_E820_TABLE + i * E820Entry.SIZE, entry.addr, entry.size,
                                   entry.type)
    return bytes(zp)
