"""`firmware.igvm_parameters`: OVMF's IGVM metadata parameter area filled through IGVM parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from igvm_builder.assemble import build_file
from igvm_builder.config import load_config
from igvm_builder.errors import InputError
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType
from igvm_builder.measure import measure_platform

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SID = SHARED / "firmware" / "sid-OVMF.amdsev.fd"
BOOKWORM = SHARED / "firmware" / "bookworm-OVMF.fd"


def _config(tmp_path: Path, firmware: Path, platforms: str, params: bool) -> Path:
    cfg = tmp_path / f"c-{platforms.replace(',', '-')}-{params}.toml"
    plats = ", ".join(f'"{p}"' for p in platforms.split(","))
    cfg.write_text(f'[image]\nplatforms = [{plats}]\n[firmware]\npath = "{firmware}"\n'
                   f"igvm_parameters = {'true' if params else 'false'}\n")
    return cfg


def _igvm_meta_from_provenance() -> dict[str, int]:
    # PROVENANCE.md lists sid's IGVM metadata: PARAM_AREA 0x812000, MEMORY_MAP at offset 0, VP_COUNT at 0xc0.
    text = (SHARED / "firmware" / "PROVENANCE.md").read_text()
    assert "0x812000" in text
    return {"area": 0x812000, "memory_map": 0x0, "vp_count": 0xC0}


def test_parameter_area_follows_the_firmware_table(tmp_path: Path) -> None:
    expected = _igvm_meta_from_provenance()
    f, _, _ = build_file(load_config(_config(tmp_path, SID, "native,snp", True)))
    areas = [h for h in f.directives if isinstance(h, H.ParameterArea)]
    inserts = [h for h in f.directives if isinstance(h, H.ParameterInsert)]
    assert len(areas) == 1 and areas[0].number_of_bytes == 0x1000
    assert [(type(h).__name__, h.byte_offset) for h in f.directives if isinstance(h, H.ParameterUsage)] == [
        ("MemoryMap", expected["memory_map"]), ("VpCount", expected["vp_count"])]
    assert len(inserts) == 1 and inserts[0].gpa == expected["area"]
    assert inserts[0].compatibility_mask == 0x3  # one insert shared by native and SNP
    # no SNP page is imported where the parameter area is inserted
    snp_mask = f.platform(PlatformType.SEV_SNP).compatibility_mask
    assert not [h for h in f.directives if isinstance(h, H.PageData) and h.gpa == expected["area"]
                and h.compatibility_mask & snp_mask]


def test_digest_changes_only_when_asked_and_matches_the_single_platform_build(tmp_path: Path) -> None:
    plain, _, _ = build_file(load_config(_config(tmp_path, SID, "snp", False)))
    with_params, _, _ = build_file(load_config(_config(tmp_path, SID, "snp", True)))
    both, _, _ = build_file(load_config(_config(tmp_path, SID, "native,snp", True)))
    d_plain = measure_platform(plain, PlatformType.SEV_SNP).digest
    d_params = measure_platform(with_params, PlatformType.SEV_SNP).digest
    assert d_plain != d_params
    assert measure_platform(both, PlatformType.SEV_SNP).digest == d_params


def test_firmware_without_igvm_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no IGVM metadata parameter area") as exc:
        build_file(load_config(_config(tmp_path, BOOKWORM, "snp", True)))
    assert str(BOOKWORM) in str(exc.value)
    out = tmp_path / "x.igvm"
    proc = subprocess.run([sys.executable, "-m", "igvm_builder", "build",
                           str(_config(tmp_path, BOOKWORM, "snp", True)), "-o", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not out.exists()
    assert len(proc.stderr.strip().splitlines()) == 1
