"""``--vcpus N`` / ``--vcpu-type T``: the launch's vCPU count and CPU model, on which the SEV-SNP
digest of the KVM loaders (``qemu``, ``cloud-hypervisor``) depends (docs/MEASUREMENT.md,
"SEV-SNP VMSAs on KVM").  Shared by ``measure``, ``sign`` and ``verify``."""

from __future__ import annotations

import argparse


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _vcpu_type(text: str) -> str:
    from igvm_builder.errors import ConfigError
    from igvm_builder.sev_vmsa import vcpu_signature

    try:
        vcpu_signature(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def add_vcpu_options(parser: argparse.ArgumentParser, default: str = "the file's VP contexts") -> None:
    parser.add_argument(
        "--vcpus", type=_positive, metavar="N",
        help=("SEV-SNP on qemu / cloud-hypervisor: the launch's vCPU count (-smp N). KVM measures one VMSA "
              "per vCPU; vCPUs the file has no VP context for get the VMM's reset state. Default: "
              f"{default}"),
    )
    parser.add_argument(
        "--vcpu-type", type=_vcpu_type, metavar="T",
        help=("SEV-SNP on qemu: the -cpu model (or CPUID(1).EAX) of the reset-state VMSAs, whose RDX is its "
              "signature (default EPYC-v4)"),
    )
