"""Flattened device trees for arm64 guests: a small generated one, and checks of a given one.

Built and read with the ``fdt`` package (PyPI ``fdt``, pure Python), whose output for the
same tree is byte for byte what ``dtc`` writes (tested against ``dtc`` and the shared CCA
vectors' dtc-built DTBs).  The generated tree has what a kernel needs from its loader and no
more: the memory node, one ``cpu`` per vCPU (PSCI enable method), PSCI (SMC conduit, as in a
realm, where the RMM forwards PSCI calls) and ``/chosen`` (bootargs, initrd range).  It has no
interrupt controller, timer or devices: those depend on the VMM's machine model, so a guest
that needs them takes the VMM's DTB as a file.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from igvm_builder.errors import InputError
from igvm_builder.recordclass import record

FDT_MAGIC = 0xD00DFEED
#: arm64 booting.rst: the DTB must not exceed 2 MiB.
MAX_DTB = 2 << 20
MODEL = "igvm-builder arm64 guest"


def _fdt() -> Any:
    import fdt  # type: ignore[import-untyped]  # the fdt package ships no type information

    return fdt


def cpu_reg(index: int) -> int:
    """MPIDR affinity of vCPU ``index`` as KVM assigns it (Aff0 0..15, then Aff1)."""
    return (index % 16) | ((index // 16) << 8)


def generate_dtb(ram: Sequence[tuple[int, int]], vcpus: int, *, bootargs: str = "",
                 initrd: tuple[int, int] | None = None, model: str = MODEL) -> bytes:
    """A DTB (version 17) for ``vcpus`` CPUs, RAM ``(base, size)`` ranges, the command line and the
    initrd ``(start, end)`` (end exclusive, as ``linux,initrd-end`` is)."""
    fdt = _fdt()
    tree = fdt.FDT()
    root = tree.root
    root.append(fdt.PropStrings("compatible", "linux,dummy-virt"))
    root.append(fdt.PropStrings("model", model))
    root.append(fdt.PropWords("#address-cells", 2))
    root.append(fdt.PropWords("#size-cells", 2))
    chosen = fdt.Node("chosen")
    if bootargs:
        chosen.append(fdt.PropStrings("bootargs", bootargs))
    if initrd is not None:
        for prop, value in (("linux,initrd-start", initrd[0]), ("linux,initrd-end", initrd[1])):
            chosen.append(fdt.PropWords(prop, value >> 32, value & 0xFFFFFFFF))
    root.append(chosen)
    for base, size in sorted(ram):
        mem = fdt.Node(f"memory@{base:x}")
        mem.append(fdt.PropStrings("device_type", "memory"))
        mem.append(fdt.PropWords("reg", base >> 32, base & 0xFFFFFFFF, size >> 32, size & 0xFFFFFFFF))
        root.append(mem)
    cpus = fdt.Node("cpus")
    cpus.append(fdt.PropWords("#address-cells", 1))
    cpus.append(fdt.PropWords("#size-cells", 0))
    for i in range(vcpus):
        reg = cpu_reg(i)
        cpu = fdt.Node(f"cpu@{reg:x}")
        cpu.append(fdt.PropStrings("device_type", "cpu"))
        cpu.append(fdt.PropStrings("compatible", "arm,arm-v8"))
        cpu.append(fdt.PropStrings("enable-method", "psci"))
        cpu.append(fdt.PropWords("reg", reg))
        cpus.append(cpu)
    root.append(cpus)
    psci = fdt.Node("psci")
    psci.append(fdt.PropStrings("compatible", "arm,psci-1.0", "arm,psci-0.2"))
    psci.append(fdt.PropStrings("method", "smc"))
    root.append(psci)
    data: bytes = tree.to_dtb(version=17)
    return data


@record
class DtbInfo:
    """What the builder checks in a given DTB."""

    size: int
    memory: tuple[tuple[int, int], ...]
    initrd: tuple[int, int] | None
    bootargs: str | None
    cpus: int


def _cells(words: Sequence[int], n: int) -> int:
    v = 0
    for w in words[:n]:
        v = (v << 32) | w
    return v


def read_dtb(data: bytes | memoryview, name: str | None = None) -> DtbInfo:
    """Check a DTB's header and read its memory ranges, ``/chosen`` initrd range and bootargs and its
    number of CPUs.

    Raises:
        InputError: not a DTB, truncated, over 2 MiB, or a structure the parser rejects.
    """
    view = memoryview(data).cast("B")
    if len(view) < 40 or struct.unpack_from(">I", view, 0)[0] != FDT_MAGIC:
        raise InputError("not a flattened device tree (no 0xd00dfeed magic)", source=name)
    total, _off_struct, _off_strings, _off_rsv, version = struct.unpack_from(">IIIII", view, 4)
    if total > len(view):
        raise InputError(f"DTB header totalsize {total:#x} is beyond the end of the file ({len(view):#x} bytes)",
                         source=name)
    if total > MAX_DTB:
        raise InputError(f"DTB is {total:#x} bytes; arm64 Linux takes at most 2 MiB", source=name)
    if version < 16:
        raise InputError(f"DTB version {version} is too old (16 or later)", source=name)
    fdt = _fdt()
    try:
        tree = fdt.parse_dtb(bytes(view[:total]))
        root = tree.root
        ac = _prop_words(root, "#address-cells") or [2]
        sc = _prop_words(root, "#size-cells") or [1]
        memory: list[tuple[int, int]] = []
        initrd = None
        bootargs = None
        cpus = 0
        for node in root.nodes:
            dtype = node.get_property("device_type")
            if dtype is not None and dtype.value == "memory":
                reg = _prop_words(node, "reg") or []
                step = ac[0] + sc[0]
                for i in range(0, len(reg) - step + 1, step):
                    memory.append((_cells(reg[i:], ac[0]), _cells(reg[i + ac[0]:], sc[0])))
            elif node.name == "chosen":
                start, end = _prop_words(node, "linux,initrd-start"), _prop_words(node, "linux,initrd-end")
                if start and end:
                    initrd = (_cells(start, len(start)), _cells(end, len(end)))
                args = node.get_property("bootargs")
                bootargs = args.value if args is not None else None
            elif node.name == "cpus":
                cpus = sum(1 for n in node.nodes if n.name == "cpu" or n.name.startswith("cpu@"))
    except InputError:
        raise
    except Exception as exc:  # the fdt package raises plain Exceptions on malformed trees
        raise InputError(f"malformed device tree: {exc}", source=name) from None
    return DtbInfo(size=total, memory=tuple(memory), initrd=initrd, bootargs=bootargs, cpus=cpus)


def _prop_words(node: Any, prop: str) -> list[int] | None:
    p = node.get_property(prop)
    if p is None:
        return None
    data = getattr(p, "data", None)
    if not isinstance(data, list) or not all(isinstance(w, int) for w in data):
        raise InputError(f"property '{prop}' of node '{node.name}' is not a list of 32-bit cells")
    return data
