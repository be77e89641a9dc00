"""The build pipeline: model, layout, streamed write and measurements spread over threads
(docs/ARCHITECTURE.md, "How a large build uses the machine"), and the reference values."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from igvm_builder.assemble.launch import _Builder
from igvm_builder.assemble.mapped import _coalesce, _Inputs, _Mapped, _windows, in_thread
from igvm_builder.config import BuildConfig
from igvm_builder.format import headers as H
from igvm_builder.format.defs import (
    PlatformType,
)
from igvm_builder.format.file import IgvmFile
from igvm_builder.format.pages import PageDigestStream
from igvm_builder.recordclass import field, record
from igvm_builder.reference import ReferenceValues

if TYPE_CHECKING:
    from igvm_builder.io import SeekableOutput


@record
class BuildResult:
    """The built file, its canonical bytes (as chunks) and its reference values."""

    file: IgvmFile
    reference_values: ReferenceValues
    _chunks: tuple[bytes | memoryview, ...] = field(repr=False)
    size: int
    sha256: str
    #: Where each chunk comes from (an mmap'd input and the offset in it), or None.
    _sources: tuple[_Mapped | None, ...] = field(default=(), repr=False, compare=False)
    #: The variable headers, when they are read back from the output (a large build's): they
    #: then follow the first chunk (the fixed header).
    _headers: _WrittenHeaders | None = field(default=None, repr=False, compare=False)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks())

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The file's bytes in order: the headers, then runs of input bytes (zero-copy views).

        Runs of an mmap'd input come in windows of at most :data:`WINDOW` bytes, and each
        window's pages leave the resident set when the consumer asks for the next chunk, so
        writing a large file does not keep its inputs resident.  A large build's headers
        were not kept: they are read back from the file written (which stays readable through
        this result however the output was closed, renamed or removed).
        """
        return _file_chunks(self._chunks, self._sources, self._headers)


def _file_chunks(chunks: Sequence[bytes | memoryview], sources: Sequence[_Mapped | None],
                 headers: _WrittenHeaders | None) -> Iterator[bytes | memoryview]:
    """The file's bytes: ``chunks`` (the first being the fixed header when ``headers`` are to be
    read back), with the headers read back after the first."""
    if headers is None:
        yield from _windows(chunks, sources)
        return
    yield chunks[0]
    yield from headers.read()
    yield from _windows(chunks[1:], sources[1:])


class _WrittenHeaders:
    """The variable headers of a build, read back from the output they were written to: a
    descriptor of its own on the file (closed when this is collected), the offset and length."""

    __slots__ = ("__weakref__", "fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        import weakref

        self.fd = os.dup(fd)
        weakref.finalize(self, os.close, self.fd)
        self.offset = offset
        self.length = length

    def read(self) -> Iterator[bytes]:
        end = self.offset + self.length
        for at in range(self.offset, end, HEAD_READ):
            piece = os.pread(self.fd, min(HEAD_READ, end - at), at)
            if not piece:
                raise OSError(f"the output ended at byte {at} of the headers written up to {end}")
            yield piece


#: Bytes of headers read back at a time (see _WrittenHeaders).
HEAD_READ = 1 << 20
#: A build keeps up to this many bytes of variable headers in memory (those of a 128 MiB
#: image): beyond, when the output can be read back, they are read back instead of kept.
HEAD_KEEP = 1 << 20


def _rereadable(output: SeekableOutput) -> int | None:
    """The file descriptor of ``output`` when it is a regular file this process can read back."""
    import io
    import stat

    try:
        fd = output.fileno()  # type: ignore[attr-defined]
        if not isinstance(fd, int) or not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        os.pread(fd, 0, 0)  # fails on a file opened for writing only
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: a build allocates a few acyclic objects per page (hundreds of
    thousands for a large initrd), and the collector would rescan them again and again."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


#: The GIL switch interval during a build.  The layout thread gives up the GIL for every page
#: it hashes (hashlib does on buffers of 2 KiB and more) and must take it back while the
#: writer and measuring threads run Python code; at the default 5 ms a page-sized job can
#: wait a whole interval for it.  0.5 ms measured 3-6% faster on a large build (bench_build).
BUILD_SWITCH_INTERVAL = 0.0005
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def _short_switch_interval() -> Iterator[None]:
    """Lower ``sys.setswitchinterval`` for the duration of a build, restoring the process's
    own value when the last concurrent build (e.g. SCons ``-j`` threads) leaves."""
    import sys

    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, BUILD_SWITCH_INTERVAL))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


# --------------------------------------------------------------------------- public API


def build_file(cfg: BuildConfig) -> tuple[IgvmFile, dict[str, str], list[str]]:
    """Build the :class:`IgvmFile` for ``cfg``; also return input SHA-256s and notes."""
    f, inputs, notes = _build_model(cfg)
    return f, inputs.sha256(), notes


def _build_model(cfg: BuildConfig) -> tuple[IgvmFile, _Inputs, list[str]]:
    """The validated file model; the inputs' SHA-256s may still be being computed."""
    b: Any
    if cfg.cca is not None:
        from igvm_builder.assemble.cca import CcaBuilder

        b = CcaBuilder(cfg)
    else:
        b = _Builder(cfg)
    try:
        with _gc_paused():
            f = b.run().validate()
    except BaseException:
        b.inputs.cancel()
        raise
    return f, b.inputs, [*b.notes, *_loader_notes(cfg, f)]


def _loader_notes(cfg: BuildConfig, f: IgvmFile) -> list[str]:
    """What QEMU (``image.loader = "qemu"``) refuses in an image with the VBS platform: its
    VBS_MEASUREMENT headers, which QEMU 10.2.2 has no handler for, whatever their mask
    (:mod:`igvm_builder.qemu_loader`, the facts ``lint --loader qemu`` reports)."""
    if cfg.loader != "qemu" or not any(p.platform_type == PlatformType.VSM_ISOLATION for p in f.platforms):
        return []
    from igvm_builder.qemu_loader import qemu_findings

    return [f"loader qemu: {why}; QEMU cannot start this image for any of its platforms (build the image "
            "QEMU starts without vbs)" for level, why, _index in qemu_findings(f) if level == "error"]


def build(cfg: BuildConfig, *, platforms: Sequence[str] | None = None, loader: str | None = None,
          output: SeekableOutput | None = None) -> BuildResult:
    """Build, serialize and measure ``cfg`` (optionally overriding platforms/loader).

    With ``output`` (a seekable binary file opened for writing, e.g.
    :class:`igvm_builder.io.AtomicFile`) the file's bytes are written to it during the build;
    the caller commits or discards it.  The work is spread over threads so that the hashing,
    which is most of a large build, keeps both cores of a small machine busy (hashlib releases
    the GIL on page-sized and larger buffers, and so do file writes):

    1. every platform but SEV-SNP (TDX, the longest) is measured in a thread as soon as the
       file model exists;
    2. meanwhile this thread lays the file out; with SEV-SNP, identical pages are found by
       each page's SHA-384, which a third thread chains into the SEV-SNP launch digest as they
       are made (:class:`~igvm_builder.format.pages.PageDigestStream`).  The data section
       and, with ``output``, the headers go to a writer thread piece by piece as they are
       laid out, the fixed header (which holds the size and the checksum) last;
    3. the writer thread computes the file's SHA-256 (reading back what it did not keep).

    With ``output``, nothing of the image is kept per page but the layout's table of distinct
    pages (16 bytes a page), so the memory of a build hardly grows with the image.
    """
    cfg = cfg.with_overrides(platforms=tuple(platforms) if platforms else None, loader=loader)
    with _short_switch_interval():
        return _build(cfg, output)


def _build(cfg: BuildConfig, output: SeekableOutput | None) -> BuildResult:
    f, inputs, notes = _build_model(cfg)  # the inputs' SHA-256s are computed meanwhile
    from igvm_builder.measure import measure_file

    ptypes = [p.platform_type for p in f.platforms]
    snp = PlatformType.SEV_SNP in ptypes
    others = [t for t in ptypes if t != PlatformType.SEV_SNP]
    cca_realm = None
    if cfg.cca is not None:
        from igvm_builder.assemble.cca import realm_of

        cca_realm = realm_of(cfg)
    measure_others = in_thread("igvm-build-measure", lambda: measure_file(
        f, platforms=others, loader=cfg.loader, tdx_two_pass=cfg.tdx.two_pass, cca_realm=cca_realm)) if others else None
    stream = PageDigestStream(len(f.directives)) if snp else None
    measure_snp = in_thread("igvm-build-snp", lambda: _measure_snp(cfg, f, stream)) if stream is not None else None
    writer = _Writer(output)
    try:
        with _gc_paused():
            head, blobs, _ = f.layout(validate=False, page_digests=stream or False,  # _build_model() validated it
                                      on_data=writer.put if output is not None else None,
                                      on_head=writer.put_head if output is not None else None)
        if stream is not None:
            stream.finish()
        data, data_sources = _coalesce(blobs)
        del blobs
        chunks = (head, *data)
        sources = (None, *data_sources)
        writer.finish(head, chunks, sources)
        snp_result = (measure_snp.result(),) if measure_snp is not None else ()
    except BaseException:
        if stream is not None:
            stream.abandon()
        writer.cancel()
        inputs.cancel()
        for task in (measure_others, measure_snp, writer.task):
            if task is not None:
                task.wait()  # leave no thread working on a failed build
        raise
    other_results = measure_others.result() if measure_others is not None else ()
    sha256, headers = writer.task.result()
    input_hashes = inputs.sha256()
    by_type = {m.platform: m for m in (*snp_result, *other_results)}
    measurements = tuple(by_type[t] for t in ptypes)
    written: _WrittenHeaders | None = None
    if isinstance(headers, _WrittenHeaders):
        written = headers
    else:  # the headers the writer kept (if any), after the fixed header
        chunks, sources = _with_headers(chunks, sources, headers)
    size = sum(len(c) for c in chunks) + (written.length if written is not None else 0)
    refs = reference_values_for(cfg, f, sha256, size, input_hashes, notes, measurements=measurements)
    return BuildResult(file=f, reference_values=refs, _chunks=chunks, size=size, sha256=sha256,
                       _sources=sources, _headers=written)


def _with_headers(chunks: tuple[bytes | memoryview, ...], sources: tuple[_Mapped | None, ...],
                  headers: Sequence[memoryview]) -> tuple[tuple[bytes | memoryview, ...], tuple[_Mapped | None, ...]]:
    """``chunks`` and their ``sources`` with ``headers`` after the first chunk (the fixed header)."""
    return (chunks[0], *headers, *chunks[1:]), (None, *(None for _ in headers), *sources[1:])


def _measure_snp(cfg: BuildConfig, f: IgvmFile, stream: PageDigestStream) -> Any:
    """The SEV-SNP measurement, from the page digests the layout streams beside it."""
    from igvm_builder.measure import measure_platform

    return measure_platform(f, PlatformType.SEV_SNP, loader=cfg.loader, tdx_two_pass=cfg.tdx.two_pass,
                            page_digests=stream, vcpus=_snp_vcpus(cfg, f), vcpu_type=cfg.snp.vcpu_type)


def _snp_vcpus(cfg: BuildConfig, f: IgvmFile) -> int | None:
    """The launch's vCPU count for the KVM loaders' SNP digest: ``snp.vcpus`` when the image starts
    a vCPU (an image of blobs only has no VP context, and nothing to count)."""
    return cfg.snp.vcpus if any(isinstance(h, H.SnpVpContext) for h in f.directives.items()) else None


class _Writer:
    """The thread that writes the file to ``output`` as the layout hands it over: the data
    section (:meth:`put`) and the variable headers (:meth:`put_head`) where they belong, then
    the fixed header at the start (:meth:`finish`); then it computes the SHA-256 of the whole
    file from the same views.  The headers are kept for that up to :data:`HEAD_KEEP` bytes;
    beyond, when ``output`` is a file it can read back, they are read back instead.  The task's
    result: the SHA-256 and the headers (the pieces kept, or a :class:`_WrittenHeaders`)."""

    #: Pieces of headers (1 MiB each) the layout may hand over before the writer has written
    #: them; beyond, it waits (a disk slower than the layout would otherwise pile them up).
    PENDING_HEADS = 4

    def __init__(self, output: SeekableOutput | None) -> None:
        import queue

        self.output = output
        self.reread = _rereadable(output) if output is not None else None
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stop = False
        self.pending = 0  # header pieces handed over, not yet written
        self.done = False  # the writer thread has ended (however): nobody waits for it
        self.written = threading.Condition()
        self.task = in_thread("igvm-build-write", self._work)

    def put(self, offset: int, blobs: list[H.BlobLike]) -> None:
        self.queue.put(("data", offset, blobs))

    def put_head(self, offset: int, piece: bytearray) -> None:
        with self.written:
            while self.pending >= self.PENDING_HEADS and not self.done:
                self.written.wait()
            self.pending += 1
        self.queue.put(("head", offset, piece))

    def finish(self, head: bytes | memoryview, chunks: Sequence[bytes | memoryview], sources: Sequence[_Mapped | None]) -> None:
        self.queue.put(("end", head, chunks, sources))

    def cancel(self) -> None:
        self.stop = True
        self.queue.put(None)

    def _work(self) -> tuple[str, list[memoryview] | _WrittenHeaders]:
        try:
            return self._run()
        finally:
            with self.written:
                self.done = True
                self.written.notify_all()

    def _run(self) -> tuple[str, list[memoryview] | _WrittenHeaders]:
        out = self.output
        kept: list[memoryview] = []  # the variable headers, while they are kept
        kept_size = 0
        head_start = head_end = 0  # where the variable headers are in the file
        dropped = False
        while True:
            item = self.queue.get()
            if item is None or self.stop:
                return "", []
            if item[0] == "head":  # a piece of the variable headers
                _, offset, piece = item
                assert out is not None
                out.seek(offset)
                out.write(piece)
                with self.written:
                    self.pending -= 1
                    self.written.notify_all()
                if not head_end:  # the first piece
                    head_start = offset
                head_end = offset + len(piece)
                if not dropped:
                    kept.append(memoryview(piece))
                    kept_size += len(piece)
                    if kept_size > HEAD_KEEP and self.reread is not None:
                        kept, dropped = [], True  # read back below instead
                continue
            if item[0] == "data":  # a batch of the data section
                _, offset, blobs = item
                assert out is not None
                out.seek(offset)
                data, sources = _coalesce(blobs)
                for c in _windows(data, sources):
                    out.write(c)
                continue
            _, head, chunks, sources = item
            headers: list[memoryview] | _WrittenHeaders = kept
            if out is not None:
                out.seek(0)
                out.write(head)
                out.seek(0, os.SEEK_END)
                if dropped:
                    assert self.reread is not None
                    flush = getattr(out, "flush", None)
                    if flush is not None:
                        flush()
                    headers = _WrittenHeaders(self.reread, head_start, head_end - head_start)
            h = hashlib.sha256()
            for c in _file_chunks(chunks, sources, headers) if isinstance(headers, _WrittenHeaders) else \
                    _windows(*_with_headers(tuple(chunks), tuple(sources), kept)):
                if self.stop:
                    return "", []
                h.update(c)
            return h.hexdigest(), headers


def reference_values_for(cfg: BuildConfig, f: IgvmFile, sha256: str, size: int, input_hashes: dict[str, str],
                         notes: Iterable[str], *, measurements: Sequence[Any] | None = None) -> ReferenceValues:
    from igvm_builder.measure.report import reference_values

    refs = reference_values(f, sha256, loader=cfg.loader, tdx_two_pass=cfg.tdx.two_pass, file_size=size,
                            measurements=measurements)
    refs["file"] = {**refs.get("file", {}), "sha256": sha256, "size": size}
    from igvm_builder.errors import ConfigError
    from igvm_builder.io import sha256_input

    config_sha = sha256_input(cfg.source, "config", error=ConfigError)[0]
    includes = {}
    for p in cfg.includes:  # included configs: a changed include is then named as such
        includes[p] = sha256_input(p, "included config", error=ConfigError)[0]
    refs["inputs"] = {
        "config": {"path": os.path.basename(cfg.source), "sha256": config_sha},
        **{cfg.input_name(p): {"path": cfg.input_name(p), "sha256": d}
           for p, d in sorted({**includes, **input_hashes}.items())},
    }
    refs["build"] = {"platforms": list(cfg.platforms), "loader": cfg.loader, "notes": list(notes)}
    if cfg.cca is not None:
        from igvm_builder.assemble.cca import realm_reference

        refs["platforms"]["cca"].update(realm_reference(cfg))
    return ReferenceValues.from_dict(refs)
