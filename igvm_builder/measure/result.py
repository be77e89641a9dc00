"""The result of measuring one platform of an IGVM file (:class:`Measurement`), shared by the
measurement engine (:mod:`~igvm_builder.measure.engine`) and the CCA realm measurement
(:mod:`~igvm_builder.measure.cca`)."""

from __future__ import annotations

from igvm_builder.format.defs import PlatformType
from igvm_builder.recordclass import field, record

__all__ = ["Measurement"]


@record
class Measurement:
    """One platform's launch measurement of a file."""

    platform: PlatformType
    compatibility_mask: int
    algorithm: str | None
    digest: bytes | None
    loader: str | None = None
    variant: str | None = None
    steps: int = 0
    notes: tuple[str, ...] = field(default=())
    #: SEV-SNP on a KVM loader (``qemu``, ``cloud-hypervisor``): the vCPU count measured (one VMSA
    #: each), the CPU model of the reset-state VMSAs, the file's VP contexts, and whether the
    #: count was given (``"given"``) or is the file's (``"file"``).  None elsewhere.
    vcpus: int | None = None
    vcpu_type: str | None = None
    vp_contexts: int | None = None
    vcpus_source: str | None = None

    @property
    def hex(self) -> str | None:
        return self.digest.hex() if self.digest is not None else None
