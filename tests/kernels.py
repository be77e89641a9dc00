"""Boot images compiled for the tests with gcc and GNU ld (this module holds no tests).

Import it by name (``tests/`` is on ``sys.path``), like ``softhsm`` and ``test_build_helpers``::

    from kernels import compile_kernel

- :func:`compile_freestanding`: any freestanding x86 C source linked with a linker script;
- :func:`compile_kernel`: the small PVH kernel (Xen PVH note, .text/.rodata, .data, .bss,
  linked at 1 MiB) built that way, with parameters for what the tests vary;
- :func:`compile_efi_stub` and :func:`objcopy_uki`: a PE32+ EFI stub and a UKI made from it
  with ``objcopy --add-section``, as older ukify and dracut did.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# --------------------------------------------------------------------------------------
# freestanding ELF kernels

CFLAGS = ["-O2", "-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fno-ident", "-mno-red-zone", "-Wl,--build-id=none"]


def compile_freestanding(out: Path, source: str, linker_script: str, *, m32: bool = False) -> Path:
    """Compile C ``source`` and link it with ``linker_script`` into the ELF executable ``out``.

    The source and the script are written to a scratch directory beside ``out`` (removed after).
    """
    work = out.parent / f".cc-{out.name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "kernel.c").write_text(source)
    (work / "kernel.ld").write_text(linker_script)
    subprocess.run(["gcc", *CFLAGS, *(["-m32"] if m32 else []), f"-Wl,-T,{work / 'kernel.ld'}", "-o", str(out),
                    str(work / "kernel.c")], check=True, capture_output=True)
    shutil.rmtree(work)
    return out


KERNEL_C = r"""
__asm__(".pushsection .note.Xen, \"a\", @note\n"
        ".balign 4\n"
        ".long 4\n.long 4\n.long 18\n"       /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        ".asciz \"Xen\"\n"
        ".balign 4\n"
        ".long pvh_start\n"
        ".popsection\n");
static unsigned char bss_area[@BSS_SIZE@];
volatile unsigned long long data_word = 0x1122334455667788ULL;
const char banner[] = "@BANNER@";
__attribute__((section(".text.start"), used, noreturn)) void _start(void)
{
    for (;;)
        bss_area[data_word & 0xfff] += (unsigned char)banner[data_word & 7];
}
__attribute__((used, noreturn)) void pvh_start(void) { _start(); }
"""

LINKER_SCRIPT = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); data PT_LOAD FLAGS(6); @NOTE_PHDR@ }
SECTIONS {
  . = 0x100000;
  .text : { *(.text.start) *(.text .text.*) } :text
  .rodata : { *(.rodata .rodata.*) } :text
  .note.Xen : { *(.note.Xen) } :text @NOTE_SEG@
  . = ALIGN(0x1000);
  .data : { *(.data .data.*) } :data
  .bss : { *(.bss .bss.*) *(COMMON) } :data
  /DISCARD/ : { *(.note.gnu.property) *(.comment) *(.eh_frame*) }
}
"""


def kernel_source(*, banner: str = "igvm-builder test kernel", bss_size: int = 0x3000) -> str:
    """The C source of :func:`compile_kernel`'s kernel: ``banner`` in .rodata, ``bss_size`` bytes of .bss."""
    if '"' in banner or "\\" in banner:
        raise ValueError(f"banner must not need C escapes: {banner!r}")
    return KERNEL_C.replace("@BSS_SIZE@", f"{bss_size:#x}").replace("@BANNER@", banner)


def compile_kernel(out: Path, *, banner: str = "igvm-builder test kernel", bss_size: int = 0x3000,
                   note_segment: bool = True, m32: bool = False) -> Path:
    """The small PVH kernel as ``out``: entry ``_start``, PVH entry ``pvh_start``, loaded at 1 MiB.

    ``note_segment``: the .note.Xen section also gets a PT_NOTE program header (else it is only
    a section); ``m32``: ELF32 (i386) instead of ELF64 (x86-64).
    """
    script = LINKER_SCRIPT.replace("@NOTE_PHDR@", "note PT_NOTE FLAGS(4);" if note_segment else "")
    script = script.replace("@NOTE_SEG@", ":note" if note_segment else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    return compile_freestanding(out, kernel_source(banner=banner, bss_size=bss_size), script, m32=m32)


# --------------------------------------------------------------------------------------
# EFI stub and UKI

IMAGE_BASE = 0x140000000  # ld -m i386pep default for an EFI application

STUB_C = "unsigned long efi_main(void *image, void *systab) { (void)image; (void)systab; return 0; }\n"


def compile_efi_stub(tmp: Path) -> Path:
    """``tmp/stub.efi``: a minimal x86-64 EFI application (PE32+) linked by GNU ld."""
    (tmp / "stub.c").write_text(STUB_C)
    subprocess.run(["gcc", "-c", "-O2", "-ffreestanding", "-fno-pic", "-fno-stack-protector", "-fno-ident",
                    "-fno-asynchronous-unwind-tables", "-mno-red-zone", "-o", str(tmp / "stub.o"),
                    str(tmp / "stub.c")], check=True)
    out = tmp / "stub.efi"
    subprocess.run(["ld", "-m", "i386pep", "--subsystem", "10", "-e", "efi_main", "-o", str(out),
                    str(tmp / "stub.o")], check=True)
    return out


def objcopy_uki(stub: Path, tmp: Path, sections: dict[str, bytes], name: str = "uki.efi") -> Path:
    """``objcopy --add-section NAME=FILE --change-section-vma NAME=VMA`` for each section."""
    args = ["objcopy"]
    vma = IMAGE_BASE + 0x100000
    for sec, payload in sections.items():
        f = tmp / ("payload" + sec)
        f.write_bytes(payload)
        args += ["--add-section", f"{sec}={f}", "--change-section-vma", f"{sec}={vma:#x}"]
        vma += (len(payload) + 0xFFFFF) & ~0xFFFFF
    out = tmp / name
    subprocess.run([*args, str(stub), str(out)], check=True, capture_output=True)
    return out
