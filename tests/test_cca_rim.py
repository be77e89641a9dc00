"""The Arm CCA Realm Initial Measurement (igvm_builder.measure.cca) against the shared CCA vectors
(RIMs of the realm-measurements oracle, per-step traces, per-page call lists) and the oracle run
live; and the IGVM -> RMI mapping (spec/CCA.md Part B §5) on files made from the call lists."""

from __future__ import annotations

import dataclasses
import shlex
import struct
from pathlib import Path

import pytest
from ccatools import (
    CASES,
    CCA_VECTORS,
    HASHES,
    call_page,
    calls,
    case,
    igvm_oracle_accepts,
    oracle_rim,
    trace,
)

from igvm_builder.errors import MeasurementError
from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import Architecture, PageDataFlags, PlatformType
from igvm_builder.measure.cca import (
    HASH_ALGORITHMS,
    Realm,
    RealmParams,
    block_sizes,
    compute_rim,
    measure_cca,
    ram_ripas_range,
    ripas_entries,
)


def _params(name: str, alg: str) -> RealmParams:
    r = calls(name)["realm"]
    return RealmParams(s2sz=r["s2sz"], num_bps=r["num_bps"], num_wps=r["num_wps"], hash_algorithm=alg,
                       sve_vl=r["sve_vl"], pmu=r["pmu"], pmu_num_ctrs=r["pmu_num_ctrs"], lpa2=r["lpa2"])


def _ram(name: str) -> tuple[tuple[int, int], ...]:
    return tuple((int(r["base"], 16), int(r["size"], 16)) for r in case(name)["ram"])


def _chain_from_calls(name: str, alg: str):  # type: ignore[no-untyped-def]
    data, recs = [], []
    for c in calls(name)["calls"]:
        if c["op"] == "DATA":
            data.append((int(c["ipa"], 16), call_page(name, c)))
        elif c["op"] == "REC":
            recs.append((c["flags"], int(c["pc"], 16), [int(g, 16) for g in c["gprs"]]))
    return compute_rim(_params(name, alg), _ram(name), data, recs, record=True)


@pytest.mark.parametrize("alg", HASHES)
@pytest.mark.parametrize("name", CASES)
def test_call_list_gives_oracle_rim_and_trace(name: str, alg: str) -> None:
    chain = _chain_from_calls(name, alg)
    assert chain.rim.hex() == case(name)["results"][alg]["oracle_rim"]
    # every step, in order: the operation, its arguments and the RIM after it
    expected = trace(name, alg)
    assert len(chain.trace) == len(expected)
    for mine, ref in zip(chain.trace, expected, strict=True):
        assert mine["op"] == ref["op"]
        for key in ("base", "top", "ipa", "flags", "pc", "params_head", "content"):
            if key in ref:
                assert str(mine[key]) == str(ref[key]), (key, ref)
        assert mine["rim"] == ref["rim"], ref
    counts = case(name)["descriptor_counts"]
    assert [s["op"] for s in chain.trace].count("INIT_RIPAS") == counts["ripas"]


@pytest.mark.parametrize("name", CASES)
def test_realm_params_bytes(name: str) -> None:
    for alg in HASHES:
        want = case(name)["realm_params"]["measured_bytes_0x00_0x38"][alg]
        assert _params(name, alg).page()[:0x38].hex() == want


def test_realm_params_example_from_spec() -> None:
    """CCA.md Part A §2's worked example: SVE|PMU, s2sz 33, 512-bit SVE, 6 bps, 4 wps, 4 counters."""
    p = RealmParams(s2sz=33, num_bps=6, num_wps=4, sve_vl=512, pmu=True, pmu_num_ctrs=4)
    assert p.page()[:0x38].hex() == ("0600000000000000" "2100000000000000" "0300000000000000" "0500000000000000"
                                     "0300000000000000" "0400000000000000" "0000000000000000")
    assert not any(p.page()[0x38:])


@pytest.mark.parametrize("name", CASES)
def test_sha384_matches_independent_implementation(name: str) -> None:
    """SHA-384 (RMM 2.0 ABI) is beyond the oracle: compared with the vectors' second implementation."""
    chain = _chain_from_calls(name, "sha384")
    assert chain.rim.hex() == case(name)["python_only"]["sha384_rmm1"]


def test_block_sizes_table() -> None:
    """CCA.md Part A §5 step 2: the entry sizes per IPA-width range."""
    k, m2, g1, g512 = 0x1000, 0x200000, 0x40000000, 0x80_0000_0000
    for s2sz in range(20, 53):
        want = ((k,) if s2sz <= 25 else (m2, k) if s2sz <= 34 else (g1, m2, k) if s2sz <= 43
                else (g512, g1, m2, k))
        assert block_sizes(s2sz) == want, s2sz


def test_ripas_walk_examples() -> None:
    """Part A §5 examples: 256 MiB at 2 GiB with s2sz 33 -> 128 x 2 MiB; 1 GiB at 1 GiB with s2sz 41
    -> one 1 GiB entry; 1537 MiB -> 1 GiB + 256 x 2 MiB + 256 x 4 KiB."""
    assert len(list(ripas_entries(0x80000000, 0x90000000, 33))) == 128
    assert list(ripas_entries(0x40000000, 0x80000000, 41)) == [(0x40000000, 0x80000000)]
    e = list(ripas_entries(*ram_ripas_range(0x40000000, 1537 << 20), 41))
    assert len(e) == 513 and e[0] == (0x40000000, 0x80000000) and e[-1][1] == 0x40000000 + (1537 << 20)


@pytest.mark.parametrize("name", ["kvmtool_ki_512M_2cpu", "qemu_k_1G_1cpu"])
def test_oracle_live_reproduces_vector(name: str) -> None:
    """The recorded oracle command, run now, prints the recorded RIM (the oracle and the vectors agree)."""
    for alg in HASHES:
        args = shlex.split(case(name)["commands"][alg])[1:]
        assert oracle_rim(args, CCA_VECTORS / name, alg) == case(name)["results"][alg]["oracle_rim"]


# --------------------------------------------------------------------------- IGVM files (Part B §5)


def igvm_from_calls(name: str, alg: str, *, boundary: int | None = None) -> IgvmFile:
    """The IGVM file Part B §5 describes for a call list."""
    s2sz = calls(name)["realm"]["s2sz"]
    dirs: list[H.Header] = []
    for c in calls(name)["calls"]:
        if c["op"] == "DATA":
            dirs.append(H.PageData(gpa=int(c["ipa"], 16), compatibility_mask=1, data=call_page(name, c)))
        elif c["op"] == "REC":
            ctx = struct.pack("<8QQQ", *(int(g, 16) for g in c["gprs"]), int(c["pc"], 16), c["flags"])
            dirs.append(H.CcaVpContext(compatibility_mask=1, vp_index=0, context=ctx))
    return IgvmFile(
        revision=2, architecture=Architecture.AARCH64,
        platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.CCA, platform_version=1,
                                       shared_gpa_boundary=boundary if boundary is not None else 1 << (s2sz - 1)),),
        initializations=(H.CcaPolicy(compatibility_mask=1, hash_algorithm=HASH_ALGORITHMS[alg]),),
        directives=tuple(dirs)).validate()


@pytest.mark.parametrize("alg", HASHES)
@pytest.mark.parametrize("name", CASES)
def test_igvm_file_rim(name: str, alg: str, tmp_path: Path) -> None:
    f = igvm_from_calls(name, alg)
    path = tmp_path / "realm.igvm"
    path.write_bytes(f.to_bytes())
    igvm_oracle_accepts(path)
    g = IgvmFile.load(path)
    realm = Realm(_params(name, "sha256"), _ram(name))  # the hash comes from the file's CCA_POLICY
    res = measure_cca(g, realm)
    assert res.hash_algorithm == alg
    assert res.rim.hex() == case(name)["results"][alg]["oracle_rim"]
    counts = case(name)["descriptor_counts"]
    assert (res.ripas, res.data_measured, res.recs) == (counts["ripas"], counts["data"], counts["rec"])
    assert res.notes == ()


def test_mapping_choices() -> None:
    """Part B's mapping on the edges: unmeasured and shared pages, a non-runnable context, a
    parameter insert, out-of-order pages; each against an explicit call list."""
    p = RealmParams(s2sz=33, num_bps=6, num_wps=6)
    ram = ((0x80000000, 64 << 20),)
    page = bytes(range(256)) * 16
    ctx = struct.pack("<8QQQ", 0x80200000, 0, 0, 0, 0, 0, 0, 0, 0x80000000, 1)
    dirs: list[H.Header] = [
        H.PageData(gpa=0x80001000, compatibility_mask=1, data=page),
        H.PageData(gpa=0x80000000, compatibility_mask=1, data=b""),  # data-less: a measured zero page
        H.PageData(gpa=0x80002000, compatibility_mask=1, data=page, flags=int(PageDataFlags.UNMEASURED)),
        H.PageData(gpa=0x80003000, compatibility_mask=1, data=page, flags=int(PageDataFlags.SHARED)),
        H.ParameterArea(number_of_bytes=0x2000, parameter_area_index=0),
        H.DeviceTree(parameter_area_index=0, byte_offset=0),
        H.ParameterInsert(gpa=0x80200000, compatibility_mask=1, parameter_area_index=0),
        H.CcaVpContext(compatibility_mask=1, vp_index=1, context=bytes(80)),  # not runnable: nothing
        H.CcaVpContext(compatibility_mask=1, vp_index=0, context=ctx),
    ]
    f = IgvmFile(revision=2, architecture=Architecture.AARCH64,
                 platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PlatformType.CCA,
                                                platform_version=1, shared_gpa_boundary=1 << 32),),
                 initializations=(H.CcaPolicy(compatibility_mask=1, hash_algorithm=1),),
                 directives=tuple(dirs)).validate()
    res = measure_cca(f, Realm(p, ram))
    want = compute_rim(dataclasses.replace(p, hash_algorithm="sha512"), ram,
                       [(0x80001000, page), (0x80000000, bytes(4096)), (0x80002000, None),
                        (0x80200000, None), (0x80201000, None)],
                       [(1, 0x80000000, [0x80200000] + [0] * 7)])
    assert res.rim == want.rim and len(res.rim) == 64
    assert (res.data_measured, res.data_unmeasured, res.recs) == (2, 3, 1)
    assert any("ascending GPA" in n for n in res.notes)
    assert any("shared" in n for n in res.notes)


def test_errors() -> None:
    with pytest.raises(MeasurementError, match="unknown CCA hash algorithm 'sha1'"):
        RealmParams(s2sz=33, num_bps=6, num_wps=6, hash_algorithm="sha1")
    with pytest.raises(MeasurementError, match="does not fit in the protected IPA space of a 32-bit realm"):
        Realm(RealmParams(s2sz=32, num_bps=6, num_wps=6), ((0x80000000, 256 << 20),))
    with pytest.raises(MeasurementError, match="breakpoints"):
        RealmParams(s2sz=33, num_bps=1, num_wps=6)
    with pytest.raises(MeasurementError, match="SVE vector length 100"):
        RealmParams(s2sz=33, num_bps=6, num_wps=6, sve_vl=100)
    f = igvm_from_calls("qemu_k_1G_1cpu", "sha256")
    g = IgvmFile(revision=2, architecture=Architecture.AARCH64, platforms=f.platforms, initializations=(),
                 directives=f.directives)
    with pytest.raises(MeasurementError, match="no CCA_POLICY"):
        measure_cca(g, Realm(_params("qemu_k_1G_1cpu", "sha256"), _ram("qemu_k_1G_1cpu")))
    # a page above the protected IPA space of the realm the caller describes
    small = Realm(RealmParams(s2sz=31, num_bps=6, num_wps=6), ((0x0, 0x10000000),))
    with pytest.raises(MeasurementError, match="outside the protected IPA space"):
        measure_cca(f, small)
