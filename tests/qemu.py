"""Run the bundled QEMU (``../shared/tools/qemu-igvm``) on an IGVM file and watch its serial console.

One helper for every test that launches a guest::

    from qemu import run_qemu

    run = run_qemu(image, marker="Shell>", stop_at_marker=True, timeout=120)
    run.check(marker="Shell>")                # fails the test with the serial log otherwise

    run = run_qemu(image, "-kernel", vmlinuz, marker="/init reached", timeout=120)
    assert run.status == 0                    # the guest powered itself off

``run_qemu`` starts ``qemu-system-x86_64 -machine q35,igvm-cfg=... -accel tcg -display none
-serial stdio -nic none -m 512`` plus the extra arguments (``image=None`` starts QEMU without an
IGVM file, e.g. for ``-kernel``), reads the serial console (QEMU's stdout) as it comes, and ends
QEMU -- SIGKILL of its process group -- when the marker appears (``stop_at_marker``), when the
wall-time bound passes, or when the test body raises. It never skips: a missing QEMU binary or a
missing runtime library (QEMU exits 127 with the loader's message) fails the test, since CI
(``./dev test``) installs them. TCG, not KVM: OVMF under KVM in a nested VM hits an emulation
failure (``../shared/tools/README.md``).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
QEMU = SHARED / "tools" / "qemu-igvm" / "bin" / "qemu-system-x86_64"

__all__ = ["QEMU", "QemuRun", "qemu_binary", "run_qemu"]


@dataclass(frozen=True)
class QemuRun:
    """What one QEMU run did.

    ``status`` is QEMU's exit status (negative: the signal that ended it), ``None`` when this
    helper killed it (``stopped_at_marker`` or ``timed_out``). ``serial`` is the console output
    decoded as UTF-8 with replacement; ``marker_at`` the seconds from start to the marker.
    """

    argv: tuple[str, ...]
    status: int | None
    serial: str
    stderr: str
    seconds: float
    marker_at: float | None
    stopped_at_marker: bool
    timed_out: bool

    def report(self) -> str:
        """Command, outcome and the whole serial log: the message of a failed boot test."""
        outcome = (
            "timed out" if self.timed_out
            else "killed at the marker" if self.stopped_at_marker
            else f"exit status {self.status}"
        )
        return (
            f"QEMU ({outcome} after {self.seconds:.1f} s): {' '.join(self.argv)}\n"
            f"--- stderr ---\n{self.stderr}\n--- serial console ---\n{self.serial}"
        )

    def check(self, *, marker: str, status: int | None = 0) -> None:
        """Fail (printing the serial log) unless ``marker`` was seen and QEMU ended as expected.

        ``status=None`` expects this helper to have stopped QEMU at the marker.
        """
        ok = marker in self.serial and not self.timed_out and self.status == status
        if status is None:
            ok = ok and self.stopped_at_marker
        if not ok:
            pytest.fail(f"expected {marker!r} and {'a kill at the marker' if status is None else f'exit status {status}'}; "
                        + self.report(), pytrace=False)


_probed: list[Path] = []


def qemu_binary() -> Path:
    """The bundled QEMU, once checked to start; fails (never skips) when it is missing or cannot run."""
    if _probed:
        return _probed[0]
    if not os.access(QEMU, os.X_OK):
        pytest.fail(f"{QEMU} is missing or not executable: the boot tests need ../shared/tools beside the checkout",
                    pytrace=False)
    probe = subprocess.run([QEMU, "-version"], capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        pytest.fail(f"{QEMU} -version failed ({probe.returncode}): {probe.stderr.strip()} "
                    "(./dev test installs its Debian runtime libraries: see ../shared/tools/README.md)",
                    pytrace=False)
    _probed.append(QEMU)
    return QEMU


def run_qemu(
    image: os.PathLike[str] | str | None,
    *extra: os.PathLike[str] | str,
    marker: str | None = None,
    stop_at_marker: bool = False,
    timeout: float = 120.0,
    machine: str = "q35",
    memory: str = "512",
    accel: str = "tcg",
) -> QemuRun:
    """Run QEMU until it exits, the marker appears (``stop_at_marker``) or ``timeout`` seconds pass."""
    argv = [str(qemu_binary())]
    if image is not None:
        argv += ["-machine", f"{machine},igvm-cfg=igvm0", "-object", f"igvm-cfg,id=igvm0,file={os.fspath(image)}"]
    else:
        argv += ["-machine", machine]
    argv += ["-accel", accel, "-m", memory, "-display", "none", "-serial", "stdio", "-nic", "none"]
    argv += [os.fspath(a) for a in extra]

    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    needle = marker.encode() if marker is not None else None
    marker_at: float | None = None
    stopped = timed_out = False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    try:
        while sel.get_map():
            left = start + timeout - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(left, 1.0)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                # search only the tail that can hold a new match
                if needle is not None and marker_at is None and key.data is out:
                    if out.find(needle, max(0, len(out) - len(chunk) - len(needle))) >= 0:
                        marker_at = time.monotonic() - start
            if marker_at is not None and stop_at_marker:
                stopped = True
                break
    finally:
        sel.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    killed = stopped or timed_out
    return QemuRun(
        argv=tuple(argv),
        status=None if killed else proc.returncode,
        serial=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        seconds=time.monotonic() - start,
        marker_at=marker_at,
        stopped_at_marker=stopped,
        timed_out=timed_out,
    )
