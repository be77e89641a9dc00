"""``IgvmFile.layout()``: the public result of the serializer, and the page digests it hands the
SEV-SNP measurement (a list by directive position, not a dict keyed by object ids)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from igvm_builder.format import IgvmFile
from igvm_builder.format import defs as D
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, as_view
from igvm_builder.measure import measure_platform

PT = D.PlatformType


def _snp_file(tmp_path: Path) -> IgvmFile:
    pages = [bytes([i]) * 4096 for i in range(6)] + [bytes([1]) * 4096]  # the last duplicates page 1
    directives: list[H.Header] = [H.PageData(gpa=0x100000 + 0x1000 * i, compatibility_mask=1, data=p)
                                  for i, p in enumerate(pages)]
    directives.insert(3, H.PageData(gpa=0x80000, compatibility_mask=1))  # no data
    directives.append(H.PageData(gpa=0x90000, compatibility_mask=1, data=b"short"))  # padded, not a 4 KiB slice
    directives.append(H.SnpVpContext(gpa=0xFFFFF000, compatibility_mask=1, vmsa=bytes(4096)))
    f = IgvmFile(platforms=(H.SupportedPlatform(compatibility_mask=1, platform_type=PT.SEV_SNP),),
                 initializations=(H.GuestPolicy(policy=0x30000, compatibility_mask=1),),
                 directives=tuple(directives))
    path = tmp_path / "snp.igvm"
    path.write_bytes(f.to_bytes())
    return IgvmFile.load(path)  # page data becomes FileSlice windows of the mapped file


def test_layout_is_the_file(tmp_path: Path) -> None:
    f = _snp_file(tmp_path)
    head, blobs, digests = f.layout()
    assert digests is None
    assert bytes(head) + b"".join(bytes(as_view(b)) for b in blobs) == f.to_bytes()


def test_layout_head_is_read_only(tmp_path: Path) -> None:
    """The headers come as a read-only view of the serializer's buffer (no copy): writing into
    it fails, so a user cannot change the laid-out headers by accident."""
    f = _snp_file(tmp_path)
    head = f.layout().head
    assert isinstance(head, memoryview) and head.readonly
    before = bytes(head)
    with pytest.raises(TypeError):
        head[0] = 0
    assert bytes(head) == before == f.to_bytes()[: len(head)]


def test_page_digests_by_directive(tmp_path: Path) -> None:
    f = _snp_file(tmp_path)
    layout = f.layout(page_digests=True)
    assert layout.page_digests is not None
    assert len(layout.page_digests) == len(f.directives)
    with_digest = 0
    for h, digest in zip(f.directives, layout.page_digests, strict=True):
        if isinstance(h, H.PageData) and type(h.data) is FileSlice and len(h.data) == 4096:
            assert digest == hashlib.sha384(as_view(h.data)).digest()
            with_digest += 1
        else:
            assert digest is None
    assert with_digest == 8  # seven pages of data and the padded short one, stored as a full page
    # the same bytes either way
    assert bytes(layout.head) + b"".join(bytes(as_view(b)) for b in layout.blobs) == f.to_bytes()
    # and the same SEV-SNP digest as hashing every page in the measurement
    fresh = measure_platform(f, PT.SEV_SNP)
    assert measure_platform(f, PT.SEV_SNP, page_digests=layout.page_digests).digest == fresh.digest


def test_page_digests_must_match_the_directives(tmp_path: Path) -> None:
    f = _snp_file(tmp_path)
    digests = f.layout(page_digests=True).page_digests
    assert digests is not None
    with pytest.raises(ValueError):
        measure_platform(f, PT.SEV_SNP, page_digests=digests[:-1])
