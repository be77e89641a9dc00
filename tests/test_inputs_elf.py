"""Tests for igvm_builder.inputs.elf: real ELF payloads, a compiled kernel, malformed files.

Expectations come from ../shared/inputs/PROVENANCE.md (hand-copied tables) and from GNU
binutils (readelf, nm, objcopy) run on the same files: differential, not self-consistent.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernels import compile_kernel, kernel_source

from igvm_builder.errors import InputError
from igvm_builder.inputs.elf import PF_R, PF_W, PF_X, ElfImage, load_elf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INPUTS = SHARED / "inputs"
GRUB = INPUTS / "grub-i386-xen_pvh.bin"
UBOOT = INPUTS / "u-boot-qemu-x86_64.elf"

for _tool in ("gcc", "readelf", "objcopy", "nm"):
    if shutil.which(_tool) is None:  # a hard requirement, not a skip (see STYLE.md pitfall 13)
        raise RuntimeError(f"{_tool} is required by these tests (GNU binutils / gcc)")

# --------------------------------------------------------------------------------------
# binutils helpers (the independent side of the differential tests)

_LOAD_RE = re.compile(
    r"^\s*LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+"
    r"([RWE ]{3})\s+(0x[0-9a-f]+)\s*$")


def readelf_loads(path: Path) -> list[dict[str, int]]:
    """PT_LOAD rows of ``readelf -lW`` in program-header order, with their header index."""
    out = subprocess.run(["readelf", "-lW", str(path)], check=True, capture_output=True,
                         text=True).stdout
    rows = []
    index = -1
    in_table = False
    for line in out.splitlines():
        if line.strip().startswith("Type"):
            in_table = True
            continue
        if in_table and not line.strip():
            break
        if not in_table or line.strip().startswith("["):
            continue
        index += 1
        m = _LOAD_RE.match(line)
        if m:
            off, vaddr, paddr, filesz, memsz, flg, align = m.groups()
            flags = (PF_R if "R" in flg else 0) | (PF_W if "W" in flg else 0) | (PF_X if "E" in flg else 0)
            rows.append({"index": index, "offset": int(off, 16), "vaddr": int(vaddr, 16),
                         "paddr": int(paddr, 16), "filesz": int(filesz, 16), "memsz": int(memsz, 16),
                         "flags": flags, "align": int(align, 16)})
    return rows


def readelf_entry(path: Path) -> int:
    out = subprocess.run(["readelf", "-hW", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return int(re.search(r"Entry point address:\s+(0x[0-9a-f]+)", out).group(1), 16)


def readelf_section(path: Path, name: str) -> tuple[int, int, str]:
    """(address, size, type) of a section from ``readelf -SW``."""
    out = subprocess.run(["readelf", "-SW", str(path)], check=True, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        parts = line.replace("[ ", "[").split()
        if len(parts) > 6 and parts[1] == name:
            return int(parts[3], 16), int(parts[5], 16), parts[2]
    raise AssertionError(f"no section {name} in {path}")


def nm_symbol(path: Path, symbol: str) -> int:
    out = subprocess.run(["nm", str(path)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        addr, _kind, name = line.split()
        if name == symbol:
            return int(addr, 16)
    raise AssertionError(f"no symbol {symbol} in {path}")


def objcopy_flat(path: Path, tmp: Path) -> bytes:
    """``objcopy -O binary``: the loadable sections laid out from the lowest LMA."""
    out = tmp / (path.name + ".flat")
    subprocess.run(["objcopy", "-O", "binary", str(path), str(out)], check=True)
    return out.read_bytes()


def assert_matches_readelf(image: ElfImage, path: Path) -> None:
    data = path.read_bytes()
    rows = [r for r in readelf_loads(path) if r["memsz"] > 0]
    rows.sort(key=lambda r: r["paddr"])
    assert len(image.segments) == len(rows)
    for seg, row in zip(image.segments, rows, strict=True):
        assert seg.index == row["index"]
        assert seg.gpa == row["paddr"]
        assert seg.vaddr == row["vaddr"]
        assert seg.offset == row["offset"]
        assert len(seg.data) == row["filesz"]
        assert seg.mem_size == row["memsz"]
        assert seg.flags == row["flags"]
        assert seg.align == row["align"]
        assert seg.data == data[row["offset"] : row["offset"] + row["filesz"]]
    assert image.entry == readelf_entry(path)


# --------------------------------------------------------------------------------------
# a tiny freestanding x86 kernel (kernels.compile_kernel), compiled for the tests

@pytest.fixture(scope="module")
def kernel64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_kernel(tmp_path_factory.mktemp("k64") / "kernel64.elf")


@pytest.fixture(scope="module")
def kernel32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_kernel(tmp_path_factory.mktemp("k32") / "kernel32.elf", m32=True)


# --------------------------------------------------------------------------------------
# real files


def test_grub_pvh_matches_provenance() -> None:
    data = GRUB.read_bytes()
    img = load_elf(data, GRUB.name, machines=("x86_64", "i386"))
    assert (img.elf_class, img.machine, img.e_type) == (32, "i386", "ET_EXEC")
    assert img.entry == 0x100000
    assert img.entry_gpa == 0x100000
    assert img.pvh_entry == 0x100000  # owner "Xen", type 0x12, descriptor 00 00 10 00
    # PROVENANCE.md: PT_LOADs 0 and 2 (GNU_STACK is 1, NOTE is 3)
    got = [(s.index, s.offset, s.gpa, len(s.data), s.mem_size, s.flags, s.align) for s in img.segments]
    assert got == [
        (0, 0x1000, 0x100000, 0xBCCB, 0x25858, PF_R | PF_W | PF_X, 0x1000),
        (2, 0xCCCB, 0x125858, 0x171CA8, 0x171CA8, PF_R | PF_W | PF_X, 4),
    ]
    assert img.segments[0].bss_size == 0x19B8D
    assert img.segments[0].end == img.segments[1].gpa  # touching, not overlapping
    assert (img.lowest_gpa, img.highest_gpa) == (0x100000, 0x125858 + 0x171CA8)
    assert_matches_readelf(img, GRUB)


def test_uboot_matches_provenance_and_objcopy(tmp_path: Path) -> None:
    data = UBOOT.read_bytes()
    img = load_elf(data, UBOOT.name, machines=("x86_64",))
    assert (img.elf_class, img.machine, img.e_type, img.entry, img.pvh_entry) == (
        64, "x86_64", "ET_EXEC", 0x1110000, None)
    assert [(s.index, s.offset, s.gpa, s.vaddr, len(s.data), s.mem_size, s.flags) for s in img.segments] == [
        (0, 0x1000, 0x1110000, 0x1110000, 0xB9C00, 0xB9C00, PF_R | PF_W | PF_X)]
    assert_matches_readelf(img, UBOOT)
    flat = objcopy_flat(UBOOT, tmp_path)
    seg = img.segments[0]
    assert flat == bytes(seg.data)[: len(flat)]
    assert not bytes(seg.data)[len(flat):].strip(b"\x00")


def test_segment_data_is_a_view_not_a_copy() -> None:
    data = GRUB.read_bytes()
    img = load_elf(data, GRUB.name)
    for seg in img.segments:
        assert isinstance(seg.data, memoryview)
        assert seg.data.obj is data
        assert seg.data.readonly


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(wrap: type) -> None:
    img = load_elf(wrap(GRUB.read_bytes()), GRUB.name)
    assert [s.gpa for s in img.segments] == [0x100000, 0x125858]


# --------------------------------------------------------------------------------------
# compiled kernels


def test_compiled_kernel64(kernel64: Path, tmp_path: Path) -> None:
    data = kernel64.read_bytes()
    img = load_elf(data, kernel64.name, machines=("x86_64",))
    assert (img.elf_class, img.machine) == (64, "x86_64")
    assert img.entry == nm_symbol(kernel64, "_start") == 0x100000
    assert img.entry_gpa == 0x100000
    assert img.pvh_entry == nm_symbol(kernel64, "pvh_start")
    assert_matches_readelf(img, kernel64)

    text, data_seg = img.segments
    assert text.gpa == 0x100000 and text.flags == PF_R | PF_X and text.bss_size == 0
    assert data_seg.flags == PF_R | PF_W
    bss_addr, bss_size, bss_type = readelf_section(kernel64, ".bss")
    assert bss_type == "NOBITS" and bss_size >= 0x3000
    assert data_seg.end == bss_addr + bss_size
    assert data_seg.gpa + len(data_seg.data) <= bss_addr
    # data_word is the first thing in .data
    assert struct.unpack_from("<Q", data_seg.data, nm_symbol(kernel64, "data_word") - data_seg.gpa)[0] == (
        0x1122334455667788)

    # objcopy -O binary lays out sections from the lowest LMA; BSS is not in it
    flat = objcopy_flat(kernel64, tmp_path)
    ours = bytearray(data_seg.gpa + len(data_seg.data) - img.lowest_gpa)
    for seg in img.segments:
        ours[seg.gpa - img.lowest_gpa : seg.gpa - img.lowest_gpa + len(seg.data)] = seg.data
    assert bytes(ours) == flat


def test_compiled_kernel32_and_wrong_machine(kernel32: Path) -> None:
    data = kernel32.read_bytes()
    img = load_elf(data, kernel32.name, machines=("x86_64", "i386"))
    assert (img.elf_class, img.machine) == (32, "i386")
    assert img.pvh_entry == nm_symbol(kernel32, "pvh_start")
    assert_matches_readelf(img, kernel32)
    with pytest.raises(InputError, match=r"kernel32\.elf: .*machine is i386.*expected x86_64"):
        load_elf(data, kernel32.name, machines=("x86_64",))


def test_pvh_note_found_through_sections(tmp_path: Path) -> None:
    """Without a PT_NOTE segment the SHT_NOTE section is searched."""
    path = compile_kernel(tmp_path / "nonote.elf", note_segment=False)
    out = subprocess.run(["readelf", "-lW", str(path)], check=True, capture_output=True, text=True).stdout
    assert "NOTE " not in out
    img = load_elf(path.read_bytes(), path.name)
    assert img.pvh_entry == nm_symbol(path, "pvh_start")


def test_object_file_rejected(tmp_path: Path) -> None:
    src = tmp_path / "k.c"
    src.write_text(kernel_source())
    obj = tmp_path / "k.o"
    subprocess.run(["gcc", "-c", "-ffreestanding", "-o", str(obj), str(src)], check=True)
    with pytest.raises(InputError, match=r"k\.o: ELF type ET_REL is not an executable"):
        load_elf(obj.read_bytes(), "k.o")


# --------------------------------------------------------------------------------------
# malformed files (mutations of the real grub image: ELF32, e_phoff 52, e_phentsize 32)

GRUB_PHOFF = 52


def grub_phdr(index: int) -> int:
    return GRUB_PHOFF + index * 32


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def test_wrong_machine_names_found_and_expected() -> None:
    with pytest.raises(InputError) as info:
        load_elf(GRUB.read_bytes(), "grub.bin", machines=("x86_64",))
    msg = str(info.value)
    assert msg.startswith("grub.bin: ")
    assert "i386" in msg and "EM_386" in msg and "x86_64" in msg


def test_no_pt_load() -> None:
    data = GRUB.read_bytes()
    data = patched(data, grub_phdr(0), "<I", 0)  # PT_NULL
    data = patched(data, grub_phdr(2), "<I", 0)
    with pytest.raises(InputError, match=r"^grub\.bin: no loadable segments"):
        load_elf(data, "grub.bin")


def test_zero_memsz_loads_are_ignored_but_not_counted() -> None:
    data = GRUB.read_bytes()
    data = patched(data, grub_phdr(0) + 20, "<I", 0)  # p_memsz of 0
    data = patched(data, grub_phdr(0) + 16, "<I", 0)  # p_filesz of 0
    img = load_elf(data, "grub.bin")
    assert [s.index for s in img.segments] == [2]


def test_overlapping_segments() -> None:
    data = patched(GRUB.read_bytes(), grub_phdr(2) + 12, "<I", 0x120000)  # p_paddr of segment 2
    with pytest.raises(InputError) as info:
        load_elf(data, "grub.bin")
    msg = str(info.value)
    assert msg.startswith("grub.bin")
    assert "segments 0" in msg and "and 2" in msg and "0x120000" in msg
    assert info.value.gpa == 0x120000


def test_nested_overlap_detected() -> None:
    """A segment inside a longer earlier one, with a third after both."""
    data = GRUB.read_bytes()
    data = patched(data, grub_phdr(1), "<I", 1)  # GNU_STACK -> PT_LOAD inside segment 0
    data = patched(data, grub_phdr(1) + 4, "<I", 0x1000)
    data = patched(data, grub_phdr(1) + 12, "<I", 0x101000)
    data = patched(data, grub_phdr(1) + 16, "<I", 0x10)
    data = patched(data, grub_phdr(1) + 20, "<I", 0x10)
    with pytest.raises(InputError, match=r"segments 0 .* and 1 .*overlap at GPA 0x101000"):
        load_elf(data, "grub.bin")


def test_segment_beyond_end_of_file() -> None:
    data = GRUB.read_bytes()[:0x100000]
    with pytest.raises(InputError, match=r"^grub\.bin\b.*segment 2 .*beyond the end of the file") as info:
        load_elf(data, "grub.bin")
    assert info.value.offset == 0xCCCB


def test_filesz_above_memsz() -> None:
    data = patched(GRUB.read_bytes(), grub_phdr(2) + 20, "<I", 0x10)  # p_memsz of segment 2
    with pytest.raises(InputError, match=r"segment 2: p_filesz 0x171ca8 > p_memsz 0x10"):
        load_elf(data, "grub.bin")


def test_segment_past_top_of_address_space() -> None:
    data = patched(GRUB.read_bytes(), grub_phdr(2) + 12, "<I", 0xFFFFF000)
    with pytest.raises(InputError, match=r"past the top of the 32-bit address space"):
        load_elf(data, "grub.bin")


def test_bad_pvh_note_size() -> None:
    data = GRUB.read_bytes()
    note = 0x17E974
    assert data[note + 12 : note + 16] == b"Xen\x00"
    data = patched(data, note + 4, "<I", 2)  # descsz 2
    with pytest.raises(InputError, match=r"2-byte descriptor"):
        load_elf(data, "grub.bin")


def test_big_endian_rejected() -> None:
    data = bytearray(GRUB.read_bytes())
    data[5] = 2  # EI_DATA = ELFDATA2MSB
    with pytest.raises(InputError, match=r"^grub\.bin: "):
        load_elf(bytes(data), "grub.bin")


@pytest.mark.parametrize(
    ("cut", "pattern"),
    [
        (0, r"not an ELF file"),
        (3, r"not an ELF file"),
        (5, r"truncated ELF identification"),
        (20, r"truncated ELF header"),
        (52, r"malformed or truncated ELF"),  # program headers missing
        (100, r"malformed or truncated ELF"),
        (0x2000, r"segment 0 .*beyond the end"),
    ],
)
def test_truncated(cut: int, pattern: str) -> None:
    with pytest.raises(InputError, match=r"^grub\.bin\b.*" + pattern):
        load_elf(GRUB.read_bytes()[:cut], "grub.bin")  # message starts with the file name


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\x7fELF", b"\x7fELF\x03\x01" + bytes(100), b"\x7fELF\x02\x01\x01" + bytes(57),
     b"MZ" + bytes(1000), bytes(range(256)) * 4],
)
def test_garbage(data: bytes) -> None:
    with pytest.raises(InputError) as info:
        load_elf(data, "junk.bin")
    assert str(info.value).startswith("junk.bin")


def test_bzimage_is_not_an_elf() -> None:
    with pytest.raises(InputError, match=r"memtest86\+x64\.bin: not an ELF file"):
        load_elf((INPUTS / "memtest86+x64.bin").read_bytes(), "memtest86+x64.bin")


@pytest.fixture(scope="module")
def kernel64_bytes(kernel64: Path) -> bytes:
    return kernel64.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 0x1FF), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 0x2100))
def test_mutations_raise_only_input_error(kernel64_bytes: bytes, edits: list[tuple[int, int]],
                                          cut: int) -> None:
    """Mutating the ELF/program headers (and truncating) gives a result or an InputError only."""
    buf = bytearray(kernel64_bytes[: max(cut, 0x200)] if cut < 0x2000 else kernel64_bytes)
    for pos, value in edits:
        buf[pos] = value
    try:
        img = load_elf(bytes(buf), "fuzz.elf")
    except InputError as exc:
        assert exc.source == "fuzz.elf"
    else:
        for seg in img.segments:
            assert len(seg.data) <= seg.mem_size


# --------------------------------------------------------------------------------------
# the header reader against pyelftools (what it used to be built on), on real and mutated files


def _pyelftools_view(data: bytes) -> tuple[object, ...] | None:
    """The fields :func:`_read_elf` returns, as pyelftools' ELFFile reads them (None: it refuses
    the file).  p_type and sh_type are compared as "is PT_LOAD / PT_NOTE / SHT_NOTE"."""
    import io

    from elftools.common.exceptions import ELFError
    from elftools.common.utils import struct_parse
    from elftools.construct.core import ConstructError
    from elftools.elf.elffile import ELFFile

    try:
        stream = io.BytesIO(data)
        elf = ELFFile(stream)
        phoff, phentsize = elf["e_phoff"], elf["e_phentsize"]
        phdrs = [struct_parse(elf.structs.Elf_Phdr, stream, phoff + i * phentsize)
                 for i in range(elf.num_segments())]
        notes: tuple[tuple[int, int, int], ...] = ()
        if not any(ph["p_type"] == "PT_NOTE" for ph in phdrs) and elf.num_sections():
            shoff, shentsize = elf["e_shoff"], elf["e_shentsize"]
            shdrs = [struct_parse(elf.structs.Elf_Shdr, stream, shoff + i * shentsize)
                     for i in range(elf.num_sections())]
            notes = tuple((sh["sh_offset"], sh["sh_size"], sh["sh_addralign"])
                          for sh in shdrs if sh["sh_type"] == "SHT_NOTE")
        return (elf.elfclass, elf.little_endian, str(elf["e_type"]), str(elf["e_machine"]), elf["e_entry"],
                tuple((ph["p_type"] == "PT_LOAD", ph["p_type"] == "PT_NOTE", ph["p_offset"], ph["p_vaddr"],
                       ph["p_paddr"], ph["p_filesz"], ph["p_memsz"], ph["p_flags"], ph["p_align"]) for ph in phdrs),
                notes)
    except (ELFError, ConstructError, struct.error, EOFError, ValueError, IndexError, KeyError, OverflowError,
            UnicodeDecodeError):
        return None


def _our_view(data: bytes) -> tuple[object, ...] | None:
    from igvm_builder.inputs.elf import _E_MACHINES, _read_elf

    try:
        raw = _read_elf(memoryview(data), "x.elf")
    except InputError as exc:
        assert str(exc).startswith("x.elf: malformed or truncated ELF file: "), exc
        return None
    machine = raw.e_machine
    if machine.isdigit() and int(machine) not in _E_MACHINES:
        machine = "?"  # a machine the module has no name for is shown as its number
    return (raw.elf_class, raw.little_endian, raw.e_type, machine, raw.e_entry,
            tuple((ph["p_type"] == 1, ph["p_type"] == 4, ph["p_offset"], ph["p_vaddr"], ph["p_paddr"],
                   ph["p_filesz"], ph["p_memsz"], ph["p_flags"], ph["p_align"]) for ph in raw.phdrs),
            raw.note_sections)


def _agree(data: bytes) -> bool:
    """Whether the two readers agree on ``data`` (a file load_elf hands to _read_elf).
    Returns whether pyelftools accepted it."""
    theirs, ours = _pyelftools_view(data), _our_view(data)
    phnum_in_section0 = struct.unpack_from("<H" if data[5] == 1 else ">H", data, 44 if data[4] == 1 else 56)[0]
    if theirs is None:
        # pyelftools also reads section 0's name (its string table) for a count it keeps there
        assert ours is None or phnum_in_section0 == 0xFFFF
        return False
    assert ours is not None
    if ours[3] == "?":
        theirs = (*theirs[:3], "?", *theirs[4:])
    assert ours == theirs
    return True


@pytest.mark.parametrize("path", [GRUB, UBOOT], ids=lambda p: p.name)
def test_header_reader_agrees_with_pyelftools_on_real_files(path: Path) -> None:
    data = path.read_bytes()
    assert _agree(data)
    assert _our_view(data)[5], "no program headers read"  # type: ignore[index]


def test_header_reader_agrees_with_pyelftools_on_compiled_kernels(kernel64: Path, kernel32: Path) -> None:
    for path in (kernel64, kernel32):
        assert _agree(path.read_bytes()), path


def test_note_sections_are_read_when_there_is_no_pt_note(tmp_path: Path) -> None:
    """A kernel linked without a PT_NOTE segment: its SHT_NOTE sections are found, as pyelftools finds them."""
    path = compile_kernel(tmp_path / "nonote.elf", note_segment=False)
    assert _agree(path.read_bytes())
    notes = _our_view(path.read_bytes())[6]  # type: ignore[index]
    assert notes and all(size > 0 for _off, size, _align in notes)  # type: ignore[union-attr]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["grub", "uboot"]),
       st.lists(st.tuples(st.integers(0, 0x1FF), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0x40, 0x3000), st.booleans())
def test_header_reader_agrees_with_pyelftools_on_mutated_headers(which: str, edits: list[tuple[int, int]],
                                                                 cut: int, truncate: bool) -> None:
    data = bytearray(_ELF_BYTES[which])
    if truncate:
        data = data[:cut]
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    if bytes(data[:4]) != b"\x7fELF" or data[4] not in (1, 2) or len(data) < (52 if data[4] == 1 else 64):
        return  # load_elf refuses these before reading headers (tested above)
    _agree(bytes(data))


_ELF_BYTES = {"grub": GRUB.read_bytes(), "uboot": UBOOT.read_bytes()}

