"""Issue #15: work and memory bounded by the input (findings 2, 3), tracebacks and silent
acceptances of kernel launches (findings 9, 10), and --depfile paths (finding 13).

The ELF kernels are compiled here (tests/kernels.py, gcc + GNU ld); the crafted IGVM files are
made with the format model and parsed back from their bytes.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from kernels import compile_kernel
from test_build_depfile import MAKE, _age, _touch
from test_build_helpers import REPO, UBOOT, cli, q

from igvm_builder.build import build_file
from igvm_builder.config import load_config
from igvm_builder.errors import ConfigError, LayoutError, MeasurementError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType
from igvm_builder.io import RECORD_OUTPUTS_ENV
from igvm_builder.measure import measure_platform
from igvm_builder.measure.engine import IMPLIED_PAGES_ENV, MAX_IMPLIED_PAGES


def _kernel_cfg(tmp: Path, kernel: Path, body: str = "", platforms: str = '"native", "snp"') -> Path:
    cfg = tmp / "k.toml"
    cfg.write_text(f"[image]\nplatforms = [{platforms}]\n[kernel]\npath = {q(kernel)}\n{body}")
    return cfg


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_kernel(tmp_path_factory.mktemp("k") / "k.elf")


# --------------------------------------------------------------------------- measurement work (finding 3)


def _parsed(platform: PlatformType, *directives: H.Header, inits: tuple[H.Header, ...] = ()) -> IgvmFile:
    f = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=platform),),
                 initializations=inits, directives=directives)
    return IgvmFile.from_bytes(f.to_bytes())


def test_error_ranges_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 9.7 KB VBS file with one large ERROR_RANGE took 47 s; now any file whose ranges exceed
    the documented limit is refused before any hashing, and the limit can be raised."""
    monkeypatch.delenv(IMPLIED_PAGES_ENV, raising=False)
    big = _parsed(PlatformType.VSM_ISOLATION, H.ErrorRange(gpa=0x100000, compatibility_mask=1, size_bytes=0xFFFFF000))
    with pytest.raises(MeasurementError, match=rf"1048575 data-less pages .* the limit is {MAX_IMPLIED_PAGES} pages"):
        measure_platform(big, PlatformType.VSM_ISOLATION)  # refused before any page is stepped through
    # under the limit: measured, and the result is the same as with the limit raised
    small = _parsed(PlatformType.VSM_ISOLATION, H.ErrorRange(gpa=0x100000, compatibility_mask=1, size_bytes=0x10000))
    digest = measure_platform(small, PlatformType.VSM_ISOLATION).digest
    monkeypatch.setenv(IMPLIED_PAGES_ENV, "16")
    assert measure_platform(small, PlatformType.VSM_ISOLATION).digest == digest  # 16 pages: at the limit
    monkeypatch.setenv(IMPLIED_PAGES_ENV, "15")
    with pytest.raises(MeasurementError, match="the limit is 15 pages"):
        measure_platform(small, PlatformType.VSM_ISOLATION)
    monkeypatch.setenv(IMPLIED_PAGES_ENV, "many")
    with pytest.raises(MeasurementError, match="is not a page count"):
        measure_platform(small, PlatformType.VSM_ISOLATION)


def test_parameter_areas_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 parameter areas of 4 GiB each in a 64 KB SNP file: refused at once (CLI: one line)."""
    monkeypatch.delenv(IMPLIED_PAGES_ENV, raising=False)
    directives: list[H.Header] = []
    for i in range(1000):
        directives += [H.ParameterArea(number_of_bytes=1 << 32, parameter_area_index=i),
                       H.ParameterInsert(gpa=(i + 1) << 33, compatibility_mask=1, parameter_area_index=i)]
    f = _parsed(PlatformType.SEV_SNP, *directives, inits=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),))
    path = tmp_path / "areas.igvm"
    path.write_bytes(f.to_bytes())
    assert path.stat().st_size < 65536
    for loader in ("hyperv", "qemu"):
        proc = cli("measure", str(path), "--loader", loader)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "parameter-area page(s) inserted" in proc.stderr and IMPLIED_PAGES_ENV in proc.stderr


# --------------------------------------------------------------------------- kernel launches (findings 2, 9, 10)


def test_tiny_memory_size_is_one_line(tmp_path: Path, kernel: Path) -> None:
    for size in ("4K", "1M", "0x100fff"):
        proc = cli("build", str(_kernel_cfg(tmp_path, kernel, f"[memory]\nsize = \"{size}\"\n")), "-o",
                   str(tmp_path / "o.igvm"))
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "memory.size" in proc.stderr and "Traceback" not in proc.stderr


def test_segments_beyond_memory_size(tmp_path: Path) -> None:
    big_bss = compile_kernel(tmp_path / "bss.elf", bss_size=64 << 20)
    with pytest.raises(LayoutError, match=r"outside guest RAM \(memory.size 0x2000000\)"):
        build_file(load_config(_kernel_cfg(tmp_path, big_bss, "[memory]\nsize = \"32M\"\n")))
    build_file(load_config(_kernel_cfg(tmp_path, big_bss, "[memory]\nsize = \"128M\"\n")))  # fits


def test_huge_bss_is_refused_before_pages_are_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """p_memsz 2^40 (issue #15 finding 2): with memory.size big enough for it, the BSS page count
    is still bounded (one error line, no page made); raising the limit lets a small one through."""
    k = compile_kernel(tmp_path / "bss.elf", bss_size=8 << 20)
    elf = bytearray(k.read_bytes())
    # the BSS segment is the last PT_LOAD: set its p_memsz to 2^40 (ELF64 program headers)
    phoff, phentsize, phnum = struct.unpack_from("<Q", elf, 32)[0], *struct.unpack_from("<HH", elf, 54)
    loads = [phoff + i * phentsize for i in range(phnum) if struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 1]
    struct.pack_into("<Q", elf, loads[-1] + 40, 1 << 40)
    huge = tmp_path / "huge.elf"
    huge.write_bytes(bytes(elf))
    proc = cli("build", str(_kernel_cfg(tmp_path, huge, "[memory]\nsize = \"2T\"\n")), "-o", str(tmp_path / "o.igvm"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "BSS" in proc.stderr and "IGVM_BUILDER_MAX_FILL_PAGES" in proc.stderr
    monkeypatch.setenv("IGVM_BUILDER_MAX_FILL_PAGES", "100")
    with pytest.raises(LayoutError, match="the limit is 100 pages"):
        build_file(load_config(_kernel_cfg(tmp_path, k, "[memory]\nsize = \"64M\"\n")))


def test_bss_pages_cost_no_data(tmp_path: Path) -> None:
    """Zero-filled BSS pages share one zero page: 48 MiB more BSS costs the page headers only
    (about 0.2 KB a page), not 4 KiB of data each as before (issue #15 finding 2: a 256 MiB BSS
    cost 310 MB)."""
    peaks = []
    for mib in (16, 64):
        k = compile_kernel(tmp_path / f"bss{mib}.elf", bss_size=mib << 20)
        cfg = load_config(_kernel_cfg(tmp_path, k, "[memory]\nsize = \"256M\"\n"))
        tracemalloc.start()
        f, _h, _n = build_file(cfg)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        bss = [h for h in f.directives if isinstance(h, H.PageData) and h.gpa >= 0x200000 and len(h.data) == 4096]
        assert len(bss) >= ((mib - 1) << 20) // 4096  # every BSS page above 2 MiB is there, zero-filled
        assert len({id(h.data) for h in bss}) == 1 and not any(bytes(bss[0].data))
    extra_pages = (48 << 20) // 4096
    assert peaks[1] - peaks[0] < extra_pages * 1024, peaks  # was > 4 KiB a page


def test_prevalidate_of_huge_memory_is_refused(tmp_path: Path, kernel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _kernel_cfg(tmp_path, kernel, "[memory]\nsize = \"64T\"\nprevalidate = true\n")
    proc = cli("build", str(cfg), "-o", str(tmp_path / "o.igvm"))  # refused before the per-page loop
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "memory.prevalidate" in proc.stderr and "IGVM_BUILDER_MAX_FILL_PAGES" in proc.stderr
    small = _kernel_cfg(tmp_path, kernel, "[memory]\nsize = \"64M\"\nprevalidate = true\n")
    monkeypatch.setenv("IGVM_BUILDER_MAX_FILL_PAGES", "1000")
    with pytest.raises(LayoutError, match="the limit is 1000 pages"):
        build_file(load_config(small))
    monkeypatch.delenv("IGVM_BUILDER_MAX_FILL_PAGES")
    f, _h, _n = build_file(load_config(small))
    assert sum(1 for h in f.directives if isinstance(h, H.PageData)) > 63 << 20 >> 12  # every RAM page


def test_entry_point_outside_every_segment(tmp_path: Path) -> None:
    elf = bytearray(UBOOT.read_bytes())
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELF64: e_entry at 24
    struct.pack_into("<Q", elf, 24, 0x7FFF_0000)
    bad = tmp_path / "bad-entry.elf"
    bad.write_bytes(bytes(elf))
    proc = cli("build", str(_kernel_cfg(tmp_path, bad, "[memory]\nsize = \"2G\"\n", '"native"')), "-o",
               str(tmp_path / "o.igvm"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "entry point 0x7fff0000 is outside" in proc.stderr and "bad-entry.elf" in proc.stderr


@pytest.mark.parametrize(("body", "needle"), [
    ('[kernel]\ncmdline = "console=ttyS0\\u0000root=/dev/evil"\n', "NUL character at offset 13"),
    ("[snp]\nguest_features = 0xFFFFFFFFFFFFFFFF\n", "sets bits igvm-builder does not know"),
    ("[snp]\ncr0 = 0xFFFFFFFFFFFFFFFF\n", "sets reserved bits"),
    ("[snp]\ncr0 = 0x100000031\n", "reserved bits 0x100000000"),
])
def test_silent_acceptances_are_errors(tmp_path: Path, kernel: Path, body: str, needle: str) -> None:
    text = _kernel_cfg(tmp_path, kernel).read_text()
    if body.startswith("[kernel]"):
        text = text.replace("[kernel]\n", body, 1)
    else:
        text += body
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(cfg)
    # the values in use stay accepted: what KVM uses (SNP + DebugSwap), long mode CR0
    ok = tmp_path / "ok.toml"
    ok.write_text(_kernel_cfg(tmp_path, kernel).read_text() + "[snp]\nguest_features = 0x21\ncr0 = 0x80000031\n")
    load_config(ok)


# --------------------------------------------------------------------------- --depfile paths (finding 13)


def test_depfile_with_colon_in_a_path_drives_make(tmp_path: Path) -> None:
    from test_build_helpers import MEMTEST

    shutil.copyfile(MEMTEST, tmp_path / "kernel:v1")
    (tmp_path / "cfg.toml").write_text('[image]\nplatforms = ["native"]\n[kernel]\npath = "kernel:v1"\n'
                                       '[memory]\nsize = "1G"\n')
    (tmp_path / "Makefile").write_text(
        "out.igvm: cfg.toml\n"
        f"\t{os.environ.get('PYTHON', 'python3')} -m igvm_builder build cfg.toml -o out.igvm --depfile out.igvm.d -q\n"
        "-include out.igvm.d\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=__import__("sys").executable)
    assert MAKE is not None

    def make(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MAKE, "-C", str(tmp_path), f"PYTHON={env['PYTHON']}", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    (tmp_path / "Makefile").write_text((tmp_path / "Makefile").read_text().replace(
        os.environ.get("PYTHON", "python3"), "$(PYTHON)"))
    first = make()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "kernel\\:v1" in (tmp_path / "out.igvm.d").read_text()
    _age(tmp_path)
    assert make("-q").returncode == 0
    _touch(tmp_path / "kernel:v1")
    assert make("-q").returncode == 1  # the kernel with a ':' in its name is a prerequisite


def test_depfile_refuses_a_newline_before_any_work(tmp_path: Path) -> None:
    from test_build_helpers import MEMTEST

    odd = tmp_path / "kernel\nv1"
    shutil.copyfile(MEMTEST, odd)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[image]\nplatforms = ["native"]\n[kernel]\npath = "kernel\\nv1"\n[memory]\nsize = "1G"\n')
    out = tmp_path / "out.igvm"
    proc = cli("build", str(cfg), "-o", str(out), "--depfile", str(out) + ".d")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "line break" in proc.stderr
    assert not out.exists() and not Path(str(out) + ".d").exists()
    assert cli("build", str(cfg), "-o", str(out)).returncode == 0  # without --depfile the path is fine


@pytest.mark.parametrize("ptype", [PlatformType.TDX, PlatformType.SEV_SNP, PlatformType.VSM_ISOLATION])
def test_insert_past_the_top_of_the_address_space(ptype: PlatformType) -> None:
    """Found by benchmarks/fuzz_campaign.py (seed 20261203): a two-page parameter area inserted at
    GPA 0xfffffffffffff000 was a struct.error in the TDX measurement; now a MeasurementError naming
    the GPA on every platform, and so is a VBS error range that wraps."""
    inits = (H.GuestPolicy(policy=0x30000, compatibility_mask=1),) if ptype == PlatformType.SEV_SNP else ()
    f = _parsed(ptype, H.ParameterArea(number_of_bytes=0x2000, parameter_area_index=0),
                H.ParameterInsert(gpa=0xFFFF_FFFF_FFFF_F000, compatibility_mask=1, parameter_area_index=0),
                inits=inits)
    for loader in ("hyperv", "qemu"):
        with pytest.raises(MeasurementError, match="past the top of the 64-bit address space") as info:
            measure_platform(f, ptype, loader=loader)
        assert info.value.gpa == 0xFFFF_FFFF_FFFF_F000
    if ptype == PlatformType.VSM_ISOLATION:
        wrap = _parsed(ptype, H.ErrorRange(gpa=0xFFFF_FFFF_FFFF_F000, compatibility_mask=1, size_bytes=0x2000))
        with pytest.raises(MeasurementError, match="error range of 0x2000 bytes runs past the top"):
            measure_platform(wrap, ptype)


# --------------------------------------------------------------------------- BSS as one run (#15 finding 2, #17)


def _bss_kernel(tmp: Path, name: str, bss: int) -> Path:
    """The test kernel with its BSS segment's p_memsz set to ``bss`` bytes (ELF64 program headers)."""
    k = compile_kernel(tmp / f"{name}.elf", bss_size=1 << 20)
    elf = bytearray(k.read_bytes())
    phoff, phentsize, phnum = struct.unpack_from("<Q", elf, 32)[0], *struct.unpack_from("<HH", elf, 54)
    loads = [phoff + i * phentsize for i in range(phnum) if struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 1]
    filesz = struct.unpack_from("<Q", elf, loads[-1] + 32)[0]
    struct.pack_into("<Q", elf, loads[-1] + 40, filesz + bss)
    out = tmp / f"{name}-bss.elf"
    out.write_bytes(bytes(elf))
    return out


#: A CLI build in a fresh process and its peak RSS: VmHWM, the high-water mark of this process's
#: own memory (``ru_maxrss`` would not do: Linux carries it across exec, so a child of pytest
#: reports pytest's peak when that is higher).
_PEAK_RSS = """
import sys
from igvm_builder.cli import main
code = main(["build", sys.argv[1], "-o", sys.argv[2], "-q"])
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak", code, hwm)
"""


def test_bss_of_a_gib_is_one_run_and_memory_stays_flat(tmp_path: Path) -> None:
    """An ELF kernel with 1 GiB of BSS: the model holds its pages as one run (not 262,144 headers:
    a 1 GiB BSS cost 86 MB to build before), the SEV-SNP digest is the one of the per-page model
    the run stands for, and the whole build (CLI, a fresh process) peaks within a few MiB of a
    16 MiB BSS build: the 32-byte header of each page goes to the file as it is made."""
    from igvm_builder.format.pages import PageRun

    small, big = _bss_kernel(tmp_path, "small", 16 << 20), _bss_kernel(tmp_path, "big", 1 << 30)
    cfg = load_config(_kernel_cfg(tmp_path, big, "[memory]\nsize = \"2G\"\n"))
    f, _h, _n = build_file(cfg)
    bss = [r for r in f.directives.items() if isinstance(r, PageRun) and r.count >= (1 << 30) // 4096]
    assert len(bss) == 1 and bss[0].fill == bytes(4096) and bss[0].source is None
    assert len(f.directives.items()) < 64 and len(f.directives) > (1 << 30) // 4096
    # the digest against the same file made of one PageData per page (the per-page engine path)
    flat = IgvmFile(revision=f.revision, platforms=f.platforms, initializations=f.initializations,
                    directives=tuple(f.directives))
    assert len(flat.directives.items()) == len(f.directives)
    assert measure_platform(f, PlatformType.SEV_SNP).digest == measure_platform(flat, PlatformType.SEV_SNP).digest
    del flat
    peaks = {}
    for name, k in (("small", small), ("big", big)):
        cfg_path = tmp_path / f"{name}.toml"
        cfg_path.write_text(f"[image]\nplatforms = [\"native\", \"snp\"]\n[kernel]\npath = {q(k)}\n"
                            "[memory]\nsize = \"2G\"\n")
        env = {k: v for k, v in os.environ.items() if k != RECORD_OUTPUTS_ENV}  # (the oracle recorder reads it)
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(cfg_path), str(tmp_path / f"{name}.igvm")],
                              capture_output=True, text=True, check=False, cwd=REPO, env=env)
        _, code, peak_kib = proc.stdout.splitlines()[-1].split()
        assert code == "0", proc.stderr
        peaks[name] = int(peak_kib)
    pages = (1 << 30) // 4096 - (16 << 20) // 4096
    assert (tmp_path / "big.igvm").stat().st_size - (tmp_path / "small.igvm").stat().st_size == 32 * pages
    # the 8 MiB of headers go to the output as they are made (measured: +3.6 MiB; they were kept,
    # and the bound was 40 MiB, when ru_maxrss, which a child inherits across exec, was read)
    print("peak RSS (KiB):", peaks)
    assert (peaks["big"] - peaks["small"]) * 1024 < 8 << 20, peaks
