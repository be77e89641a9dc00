"""lint reports a digest difference only for the platform whose digest differs.

The README's own config (snp + tdx from Debian's OVMF) puts TDX pages after the SNP VMSAs:
they are not SEV-SNP pages, so the KVM loaders' "VMSAs last" rule changes nothing for SNP and
lint must not warn.  An SNP page after an SNP VMSA still gets the warning, and that warning is
true: the file's qemu digest differs from the reference model's (hyperv).
"""

from __future__ import annotations

import re
from pathlib import Path

from cli_release import run
from test_sign_cli import write_file

from igvm_builder.format import IgvmFile
from igvm_builder.format import headers as H
from igvm_builder.format.defs import PlatformType
from igvm_builder.lint import lint
from igvm_builder.measure import measure_platform

README = Path(__file__).resolve().parents[1] / "README.md"
FINDING = "pages after a VP context"


def readme_config() -> str:
    text = README.read_text()
    block = re.search(r"A minimal config.*?```toml\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README lost its minimal config"
    return block.group(1)


def test_readme_snp_tdx_config_has_no_snp_vmsa_order_warning(tmp_path: Path) -> None:
    cfg = tmp_path / "guest.toml"
    cfg.write_text(readme_config())
    out = tmp_path / "guest.igvm"
    rc, _, err = run("build", cfg, "-o", out, "-q")
    assert rc == 0, err
    f = IgvmFile.load(out)
    snp_mask = next(p.compatibility_mask for p in f.platforms if p.platform_type == PlatformType.SEV_SNP)
    first_vmsa = next(i for i, h in enumerate(f.directives) if isinstance(h, H.SnpVpContext))
    later_pages = [h for h in f.directives[first_vmsa:] if isinstance(h, H.PageData)]
    # the situation the issue describes: pages after the SNP VMSAs, none of them SNP's
    assert later_pages and not any(h.compatibility_mask & snp_mask for h in later_pages)
    for loader in ("qemu", "cloud-hypervisor"):
        assert not any(FINDING in fd.message for fd in lint(f, loader)), loader
        rc, out_text, _ = run("lint", out, "--loader", loader)
        assert FINDING not in out_text


def test_an_snp_page_after_the_vmsa_is_reported(tmp_path: Path) -> None:
    f = IgvmFile.load(write_file(tmp_path / "in.igvm"))
    page = H.PageData(gpa=0x30000, compatibility_mask=1, data=bytes([7]) * 4096)
    late = IgvmFile(platforms=f.platforms, initializations=f.initializations, directives=(*f.directives, page))
    findings = [fd for fd in lint(late, "qemu") if FINDING in fd.message]
    assert len(findings) == 1 and "SEV-SNP digest differs" in findings[0].message
    # and it is true: QEMU measures the VMSA after that page, the reference model before it
    snp = PlatformType.SEV_SNP
    assert measure_platform(late, snp, loader="qemu").digest != measure_platform(late, snp, loader="hyperv").digest
    assert not any(FINDING in fd.message for fd in lint(f, "qemu"))
