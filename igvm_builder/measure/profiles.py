"""Loader profiles: how each IGVM loader turns directives into SEV-SNP launch steps.

The same IGVM file can legitimately give different SNP launch digests on different
loaders (``shared/spec/MEASUREMENT.md`` §3).  Each profile records the rules one loader
follows.  ``hyperv`` is the default: it is the reference crate's model
(microsoft/igvm ``generate_snp_measurement``), which Hyper-V and OpenVMM implement and
against which the reference vectors were computed.
"""

from __future__ import annotations

from igvm_builder.errors import MeasurementError
from igvm_builder.format.defs import PlatformType
from igvm_builder.recordclass import record

KVM_VMSA_GPA = 0xFFFF_FFFF_F000


@record
class LoaderProfile:
    name: str
    description: str
    #: SNP page type of a measured PAGE_DATA without data: 1 NORMAL (zeros) or 3 ZERO.
    dataless_page_type: int
    #: Whether PAGE_DATA with the ``shared`` flag is skipped (True) or measured like any page.
    skip_shared: bool
    #: UNMEASURED steps per PARAMETER_INSERT: every page of the area, or only one.
    insert_all_pages: bool
    #: VMSAs measured by KVM after every page at 0xFFFFFFFFF000 (True) or in file order (False).
    vmsa_last_at_kvm_gpa: bool
    #: Pages imported in ascending GPA order rather than file order.
    sort_by_gpa: bool = False
    #: The VMM whose KVM transform of each VMSA is measured, plus one reset-state VMSA per vCPU
    #: without a VP context (:mod:`igvm_builder.kvm_vmsa`); None: the file's VMSA bytes as they are.
    kvm_vmm: str | None = None
    #: Every SEV VP context of the file is measured, whatever its compatibility mask (COCONUT
    #: igvmmeasure: an SEV-ES VMSA of a file that also carries SEV-SNP counts in the SNP digest).
    vmsa_any_mask: bool = False
    #: An SEV-SNP platform without a GUEST_POLICY is refused (a loader cannot launch it); the
    #: igvmmeasure tool measures such a file all the same.
    requires_policy: bool = True
    #: The platforms the loader launches (lint warns that it ignores the others); None: it reads any.
    platforms: frozenset[PlatformType] | None = None
    #: Whether the loader refuses a PAGE_DATA with ``is_2mb_page`` (True) or reads it as 4 KiB.
    refuses_2mb_pages: bool = False
    #: A PAGE_DATA with ``is_2mb_page`` is 512 consecutive 4 KiB pages (COCONUT igvmmeasure); when
    #: False such a page is read as one 4 KiB page.
    expands_2mb_pages: bool = False


_PT = PlatformType
_KVM_PLATFORMS = frozenset({_PT.NATIVE, _PT.SEV_SNP, _PT.SEV, _PT.SEV_ES})  # QEMU
_CLOUD_HYPERVISOR_PLATFORMS = frozenset({_PT.NATIVE, _PT.SEV_SNP})
_HYPERV_PLATFORMS = frozenset({_PT.NATIVE, _PT.SEV_SNP, _PT.TDX, _PT.VSM_ISOLATION})

PROFILES: dict[str, LoaderProfile] = {
    p.name: p
    for p in (
        LoaderProfile("hyperv", "Hyper-V and OpenVMM (microsoft/igvm's measurement model, which the reference "
                      "vectors follow; the default)",
                      dataless_page_type=1, skip_shared=True, insert_all_pages=True, vmsa_last_at_kvm_gpa=False,
                      platforms=_HYPERV_PLATFORMS, refuses_2mb_pages=True),
        LoaderProfile("qemu", "QEMU >= 10.1 launching the IGVM file itself (-object igvm-cfg) on KVM",
                      dataless_page_type=1, skip_shared=False, insert_all_pages=True, vmsa_last_at_kvm_gpa=True,
                      kvm_vmm="qemu", platforms=_KVM_PLATFORMS),
        LoaderProfile("cloud-hypervisor", "Cloud Hypervisor on KVM; for an OVMF image also QEMU's -bios launch, "
                      "i.e. sev-snp-measure --vmm-type QEMU", dataless_page_type=3, skip_shared=False,
                      insert_all_pages=True, vmsa_last_at_kvm_gpa=True, kvm_vmm="cloud-hypervisor",
                      platforms=_CLOUD_HYPERVISOR_PLATFORMS),
        LoaderProfile("cloud-hypervisor-mshv", "Cloud Hypervisor on MSHV (Microsoft hypervisor; read from its "
                      "source, not run here)",
                      dataless_page_type=1, skip_shared=False, insert_all_pages=False,
                      vmsa_last_at_kvm_gpa=False, sort_by_gpa=True, platforms=_CLOUD_HYPERVISOR_PLATFORMS),
        LoaderProfile("igvmmeasure", "COCONUT-SVSM igvmmeasure (its default mode)", dataless_page_type=1,
                      skip_shared=False, insert_all_pages=False, vmsa_last_at_kvm_gpa=False, vmsa_any_mask=True,
                      requires_policy=False, expands_2mb_pages=True),
        LoaderProfile("igvmmeasure-native-zero", "COCONUT-SVSM igvmmeasure --native-zero (loaders with a native "
                      "ZERO page type, such as Vanadium)",
                      dataless_page_type=3, skip_shared=False, insert_all_pages=False,
                      vmsa_last_at_kvm_gpa=False, vmsa_any_mask=True,
                      requires_policy=False, expands_2mb_pages=True),
    )
}

DEFAULT_LOADER = "hyperv"
#: The loaders a build can target (`build --loader`, config `image.loader`).
BUILD_LOADERS = ("qemu", "hyperv", "cloud-hypervisor")


def get_profile(name: str | None) -> LoaderProfile:
    if name is None:
        return PROFILES[DEFAULT_LOADER]
    try:
        return PROFILES[name.lower()]
    except (KeyError, AttributeError):
        raise MeasurementError(f"unknown loader '{name}' (known: {', '.join(PROFILES)})") from None
