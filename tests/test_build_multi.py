"""Issue #4: one file for several platforms.

Each platform's view of a multi-platform file (the headers whose mask has its bit) must be
exactly the single-platform build, so its launch digest is the same; pages identical across
platforms are stored once, so the file is smaller than the single builds together.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_build_helpers import (
    MEMTEST,
    OVMF_BOOKWORM,
    OVMF_SID,
    VMLINUZ,
    build_bytes,
    config,
    mask_of,
    projection,
    q,
    without_masks,
)

from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType
from igvm_builder.format.file import IgvmFile
from igvm_builder.measure import measure_platform

SNP_LOADERS = ("hyperv", "qemu", "cloud-hypervisor")


def digests(f: IgvmFile, platform: str) -> dict[str, str | None]:
    """Every launch digest of one platform (all SNP loader profiles, both TDX page orders)."""
    from test_build_helpers import PLATFORM

    ptype = PLATFORM[platform]
    if ptype == PlatformType.SEV_SNP:
        return {loader: measure_platform(f, ptype, loader=loader).hex for loader in SNP_LOADERS}
    if ptype == PlatformType.TDX:
        return {f"two_pass={tp}": measure_platform(f, ptype, tdx_two_pass=tp).hex for tp in (False, True)}
    return {"digest": measure_platform(f, ptype).hex}


def policies(f: IgvmFile, platform: str) -> list[int]:
    mask = mask_of(f, platform)
    return [h.policy for h in f.initializations if isinstance(h, H.GuestPolicy) and h.compatibility_mask & mask]


def check_multi_equals_singles(tmp_path: Path, body_for: dict[str, str], platforms: list[str]) -> tuple[int, list[int]]:
    """Build each platform alone and all together; compare views, digests, policies and sizes."""
    plist = ", ".join(f'"{p}"' for p in platforms)
    multi_bytes = build_bytes(config(tmp_path, body_for["all"].replace("@PLATFORMS@", plist), "multi.toml"))
    multi = IgvmFile.from_bytes(multi_bytes)
    assert [p.platform_type for p in multi.platforms] == [
        {"native": PlatformType.NATIVE, "snp": PlatformType.SEV_SNP, "tdx": PlatformType.TDX,
         "vbs": PlatformType.VSM_ISOLATION, "sev": PlatformType.SEV, "sev-es": PlatformType.SEV_ES}[p]
        for p in platforms]
    single_sizes = []
    for p in platforms:
        single_bytes = build_bytes(config(tmp_path, body_for["all"].replace("@PLATFORMS@", f'"{p}"'), f"{p}.toml"))
        single_sizes.append(len(single_bytes))
        single = IgvmFile.from_bytes(single_bytes)
        assert without_masks(projection(multi, p)) == without_masks(projection(single, p)), p
        assert policies(multi, p) == policies(single, p), p
        if p != "native":
            d = digests(multi, p)
            assert all(d.values()), d
            assert d == digests(single, p), p
    return len(multi_bytes), single_sizes


def test_ovmf_native_snp_tdx(tmp_path: Path) -> None:
    body = f"""
[image]
platforms = [@PLATFORMS@]
[firmware]
path = {q(OVMF_BOOKWORM)}
[snp]
vcpus = 2
[tdx]
policy = 0x2
"""
    size, singles = check_multi_equals_singles(tmp_path, {"all": body}, ["native", "snp", "tdx"])
    assert size < sum(singles)
    # the 2 MiB of firmware is stored once: the three-platform file is barely larger than the largest
    assert size < max(singles) + 0.1 * max(singles), (size, singles)


def test_ovmf_with_kernel_hashes_native_snp_tdx(tmp_path: Path) -> None:
    """sid OVMF + kernel: measured direct boot for SNP; native and TDX get the plain firmware."""
    body = f"""
[image]
platforms = [@PLATFORMS@]
[firmware]
path = {q(OVMF_SID)}
[kernel]
path = {q(VMLINUZ)}
cmdline = "console=ttyS0"
"""
    size, singles = check_multi_equals_singles(tmp_path, {"all": body}, ["native", "snp", "tdx"])
    assert size < sum(singles)


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(random.Random(11).randbytes(2 * 1024 * 1024 + 77))
    return path


def test_kernel_native_snp_tdx(tmp_path: Path, initrd: Path) -> None:
    body = f"""
[image]
platforms = [@PLATFORMS@]
[kernel]
path = {q(VMLINUZ)}
initrd = {q(initrd)}
cmdline = "console=ttyS0 quiet"
[memory]
size = "2G"
"""
    size, singles = check_multi_equals_singles(tmp_path, {"all": body}, ["native", "snp", "tdx"])
    assert size < sum(singles)
    # the 14 MB kernel and the initrd are stored once
    assert size < max(singles) + 0.05 * max(singles), (size, singles)


def test_kernel_all_six_platforms(tmp_path: Path, initrd: Path) -> None:
    """memtest86+ (64-bit entry, no PVH note) boots on every x86 platform; VBS gets its measurement header."""
    body = f"""
[image]
platforms = [@PLATFORMS@]
[kernel]
path = {q(MEMTEST)}
initrd = {q(initrd)}
cmdline = "console=ttyS0"
"""
    platforms = ["native", "snp", "tdx", "vbs", "sev", "sev-es"]
    size, singles = check_multi_equals_singles(tmp_path, {"all": body}, platforms)
    assert size < sum(singles)
    multi = IgvmFile.from_bytes(build_bytes(config(tmp_path, body.replace("@PLATFORMS@", '"vbs"'), "v.toml")))
    vbs = [h for h in multi.directives if isinstance(h, H.VbsMeasurement)]
    assert len(vbs) == 1
    digest = measure_platform(multi, PlatformType.VSM_ISOLATION).digest
    assert bytes(vbs[0].boot_measurement_digest)[: len(digest)] == digest


# --------------------------------------------------------------------------- merge_directives


def _random_lists(seed: int, n_platforms: int, size: int) -> list[tuple[int, list[H.Header]]]:
    """Per-platform lists drawn from a shared pool (so runs agree) with private insertions,
    deletions, duplicates and VP contexts, like real plans but with adversarial shapes."""
    rng = random.Random(seed)
    pool = [H.PageData(gpa=0x1000 * i, compatibility_mask=0, data=bytes([i % 251]) * 8) for i in range(size)]
    lists = []
    for p in range(n_platforms):
        mask = 1 << p
        items: list[H.Header] = []
        for h in pool:
            r = rng.random()
            if r < 0.05:
                continue  # this platform lacks the page
            if r < 0.10:  # a private page (equal content but another GPA space: never shared)
                items.append(H.PageData(gpa=(1 << 40) + 0x1000 * rng.randrange(size), compatibility_mask=0,
                                        data=b"private" + bytes([p])))
            if r < 0.12 and items:  # a page repeated far away
                items.insert(rng.randrange(len(items)), items[-1])
            items.append(h)
        if rng.random() < 0.5:
            rng.shuffle(items[: len(items) // 3])  # a reordered prefix
        items.append(H.NativeVpContext(compatibility_mask=0, vp_index=0, context=bytes(232)))
        lists.append((mask, items))
    return lists


@pytest.mark.parametrize("seed", range(12))
def test_merge_directives_keeps_every_platform_list(seed: int) -> None:
    from igvm_builder.assemble import merge_directives

    n_platforms = 1 + seed % 4
    lists = _random_lists(seed, n_platforms, 50 + 150 * (seed % 5))
    merged = merge_directives(lists)
    for mask, items in lists:
        mine = [h for h in merged if h.compatibility_mask & mask]
        assert without_masks(mine) == without_masks(items)
    # VP contexts, identical on every platform, keep one platform each; shared pages are stored once
    ctx_masks = [h.compatibility_mask for h in merged if isinstance(h, H.NativeVpContext)]
    assert sorted(ctx_masks) == [1 << p for p in range(n_platforms)]
    assert len(merged) <= sum(len(items) for _, items in lists)
    if n_platforms > 1:
        assert any(bin(h.compatibility_mask).count("1") > 1 for h in merged)
