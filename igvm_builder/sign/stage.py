"""The signing stage: one path from "sign this image" to a signed file, for every front end.

``igvm-builder sign`` (one-step mode) and the SCons ``IGVMSign`` builder both call
:func:`plan_signing` then :func:`sign_file`, so they agree on

* the loader whose launch digest is signed: an explicit override (``--loader``,
  ``$IGVM_LOADER``), else the build config's ``image.loader``, else
  :data:`~igvm_builder.measure.profiles.DEFAULT_LOADER`; the outcome says which;
* the config's ``[sign]`` table (keys, FAMILY_ID, IMAGE_ID, GUEST_SVN), each value
  overridable, key paths relative to the config;
* the TEST-ONLY key policy: the public test keys of ``shared/keys`` are refused unless
  explicitly allowed (``--allow-test-keys``, ``IGVM_ALLOW_TEST_KEYS``);
* the one-line result (:meth:`SignOutcome.line`): loader, launch digest prefix, key digests.

Only key digests are ever reported, never key material.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from igvm_builder.errors import SigningError
from igvm_builder.recordclass import field, record

if TYPE_CHECKING:
    from igvm_builder.config import BuildConfig
    from igvm_builder.format.file import IgvmFile, Layout
    from igvm_builder.format.headers import BlobLike
    from igvm_builder.measure.result import Measurement
    from igvm_builder.reference import ReferenceValues

__all__ = ["SignOutcome", "SignPlan", "SnpMeasured", "check_test_keys", "launch_vcpus", "plan_signing",
           "resolve_key_spec", "sign_file", "sign_file_layout", "signed_reference_values", "starts_a_vcpu"]

_NON_FILE_SCHEMES = ("env", "pkcs11", "cmd")


def resolve_key_spec(spec: str, base: str) -> str:
    """``spec`` with a relative file path made absolute against the directory ``base``.

    Spec forms are those of :func:`igvm_builder.sign.keys.key_source_from_spec`: ``PATH``,
    ``file:PATH``, ``env:VAR``, ``pkcs11:URI``, ``cmd:COMMAND``; only paths move.
    """
    scheme, sep, rest = spec.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme in _NON_FILE_SCHEMES or (scheme == "file" and rest.startswith("//")):
        return spec
    prefix, path = ("file:", rest) if scheme == "file" else ("", spec)
    if not path:
        return spec
    return prefix + os.path.join(base, os.path.expanduser(path))


@record(kw_only=True)
class SignPlan:
    """What will be signed and how; no key has been opened yet."""

    id_key: str
    author_key: str | None
    loader: str
    #: Where the loader came from, for the result line: "--loader", "image.loader of x.toml", "default".
    loader_from: str
    family_id: bytes
    image_id: bytes
    guest_svn: int
    #: The launch's vCPU count and model for the KVM loaders' digest: given explicitly, else the
    #: config's [snp] values for an image that starts a vCPU (as its reference values do), else None.
    vcpus: int | None = None
    vcpu_type: str | int | None = None
    #: True when vcpus/vcpu_type were given explicitly (not from the config).
    vcpus_explicit: bool = False


def plan_signing(
    *,
    config: BuildConfig | None = None,
    id_key: str | None = None,
    author_key: str | None = None,
    loader: str | None = None,
    loader_option: str = "--loader",
    family_id: bytes | str | None = None,
    image_id: bytes | str | None = None,
    guest_svn: int | str | None = None,
    id_key_option: str = "--id-key",
    vcpus: int | None = None,
    vcpu_type: str | int | None = None,
) -> SignPlan:
    """Merge explicit options over the config's ``[sign]`` table and ``image.loader``.

    ``None`` (or ``""``) means "not given here".  Explicit key specs are used as given
    (the caller resolved relative paths); the config's are relative to the config.
    SigningError when no ID key is given anywhere (naming ``id_key_option`` and the
    config key) or the loader is unknown.
    """
    from igvm_builder.measure.profiles import DEFAULT_LOADER, PROFILES
    from igvm_builder.sign.image import _guest_svn, parse_id16

    base = os.path.dirname(config.source) if config is not None else "."
    sign = config.sign if config is not None else None
    if id_key:
        id_spec = id_key
    elif sign is not None and sign.id_key:
        id_spec = resolve_key_spec(sign.id_key, base)
    else:
        where = f" or [sign] id_key in {config.source}" if config is not None else " (or a config with [sign] id_key)"
        raise SigningError(f"no ID key: give {id_key_option}{where}")
    author_spec = author_key or (resolve_key_spec(sign.author_key, base) if sign is not None and sign.author_key
                                 else None)
    if loader:
        name, origin = loader.strip().lower(), loader_option
    elif config is not None:
        name, origin = config.loader, f"image.loader of {os.path.basename(config.source)}"
    else:
        name, origin = DEFAULT_LOADER, "default"
    if name not in PROFILES:
        raise SigningError(f"unknown loader '{loader}' given by {origin} (choose from {', '.join(PROFILES)})")
    return SignPlan(
        id_key=id_spec,
        author_key=author_spec or None,
        loader=name,
        loader_from=origin,
        family_id=parse_id16(family_id if family_id not in (None, "") else
                             (sign.family_id if sign is not None else None), "family_id"),
        image_id=parse_id16(image_id if image_id not in (None, "") else
                            (sign.image_id if sign is not None else None), "image_id"),
        guest_svn=_guest_svn(guest_svn if guest_svn not in (None, "") else
                             (sign.guest_svn if sign is not None else None)),
        vcpus=vcpus if (vcpus, vcpu_type) != (None, None) or config is None else config.snp.vcpus,
        vcpu_type=vcpu_type if (vcpus, vcpu_type) != (None, None) or config is None else config.snp.vcpu_type,
        vcpus_explicit=(vcpus, vcpu_type) != (None, None),
    )


def starts_a_vcpu(f: IgvmFile) -> bool:
    """Whether ``f`` has an SEV-SNP VP context (only then do the config's vCPUs apply)."""
    from igvm_builder.format import headers as H

    return any(isinstance(h, H.SnpVpContext) for h in f.directives.items())  # (runs of pages stay runs)


def launch_vcpus(f: IgvmFile, plan: SignPlan) -> tuple[int | None, str | int | None]:
    """The (vcpus, vcpu_type) to sign ``f`` for: explicit ones always, the config's only for an
    image that starts a vCPU (as the build's reference values)."""
    if plan.vcpus_explicit or starts_a_vcpu(f):
        return plan.vcpus, plan.vcpu_type
    return None, None


def check_test_keys(digests: Mapping[str, bytes | None], *, allow: bool, how_to_allow: str) -> str | None:
    """Refuse the public TEST-ONLY keys unless ``allow``; return the warning to show when allowed.

    ``digests`` maps a role ("ID", "author") to its key digest (None: no such key);
    ``how_to_allow`` names the switch in the error (``--allow-test-keys``).
    """
    from igvm_builder.sign.idblock import TEST_ONLY_KEY_DIGESTS

    test = [role for role, d in digests.items() if d is not None and d in TEST_ONLY_KEY_DIGESTS]
    if not test:
        return None
    which = " and ".join(test)
    if not allow:
        raise SigningError(
            f"refusing to sign with the public TEST-ONLY {which} key (shared/keys): anything signed with it "
            f"proves nothing; {how_to_allow} for tests"
        )
    return f"the public TEST-ONLY {which} key was used (tests only)"


@record(kw_only=True)
class SnpMeasured:
    """An SEV-SNP measurement made while signing, and the launch it measured: the loader
    profile, and the vCPU count and model as given to ``measure_platform`` (None: the file's
    VP contexts, the default model)."""

    loader: str
    vcpus: int | None
    vcpu_type: str | int | None
    measurement: Measurement

    def serves(self, loader: str, vcpus: int | None, vcpu_type: str | int | None, mask: int) -> bool:
        """Whether this is the measurement of the SEV-SNP platform ``mask`` for that launch."""
        return (self.loader, self.vcpus, self.vcpu_type) == (loader, vcpus, vcpu_type) \
            and self.measurement.compatibility_mask == mask and self.measurement.loader == loader


@record(kw_only=True)
class SignOutcome:
    """What was signed: every field a verifier pins (no key material)."""

    output: str
    loader: str
    loader_from: str
    launch_digest: bytes
    policy: int
    family_id: bytes
    image_id: bytes
    guest_svn: int
    id_key_digest: bytes
    author_key_digest: bytes | None
    replaced: bool
    #: Set when a TEST-ONLY key was used (allowed): the warning to show.
    test_key_warning: str | None = None
    #: The SEV-SNP measurement whose digest was signed and the launch it is for: what the signed
    #: image's reference values take instead of measuring SEV-SNP again (not in :meth:`as_dict`).
    measured: SnpMeasured | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        """The one-line result: loader (and where it came from), launch digest prefix, key digests."""
        action = "replaced the" if self.replaced else "added an"
        author = self.author_key_digest.hex() if self.author_key_digest is not None else "none"
        return (f"{self.output}: {action} SEV-SNP ID block for loader {self.loader} ({self.loader_from}): "
                f"launch digest {self.launch_digest.hex()[:16]}..., ID key digest {self.id_key_digest.hex()}, "
                f"author key digest {author}, policy {self.policy:#x}, guest svn {self.guest_svn}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "action": "replaced" if self.replaced else "added",
            "loader": self.loader,
            "loader_from": self.loader_from,
            "launch_digest": self.launch_digest.hex(),
            "policy": f"{self.policy:#x}",
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "guest_svn": self.guest_svn,
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex() if self.author_key_digest is not None else None,
            "test_only_key": self.test_key_warning is not None,
        }


def sign_file(
    f: IgvmFile, plan: SignPlan, *, output: str, allow_test_keys: bool = False,
    how_to_allow: str = "pass --allow-test-keys",
) -> tuple[IgvmFile, SignOutcome]:
    """Sign ``f`` as ``plan`` says; the key policy is checked before anything is signed.

    The signature is verified after signing (by :func:`~igvm_builder.sign.sign_id_block`).
    """
    out, outcome, _layout = sign_file_layout(f, plan, output=output, allow_test_keys=allow_test_keys,
                                             how_to_allow=how_to_allow)
    return out, outcome


def sign_file_layout(
    f: IgvmFile, plan: SignPlan, *, output: str, allow_test_keys: bool = False,
    how_to_allow: str = "pass --allow-test-keys", on_data: Callable[[int, list[BlobLike]], object] | None = None,
) -> tuple[IgvmFile, SignOutcome, Layout]:
    """:func:`sign_file`, and the signed file's bytes as :meth:`IgvmFile.layout` gives them
    (what to write: :func:`~igvm_builder.sign.image.sign_igvm_layout` hashes each page once;
    ``on_data`` receives the data section before the file is signed, as it does)."""
    from igvm_builder.format.defs import PlatformType
    from igvm_builder.sign.idblock import key_digest
    from igvm_builder.sign.image import find_id_blocks, sign_igvm_measured
    from igvm_builder.sign.keys import key_source_from_spec

    id_key = key_source_from_spec(plan.id_key)
    author_key = key_source_from_spec(plan.author_key) if plan.author_key else None
    warning = check_test_keys(
        {"ID": key_digest(id_key.public_key()),
         "author": key_digest(author_key.public_key()) if author_key is not None else None},
        allow=allow_test_keys, how_to_allow=how_to_allow,
    )
    snp = f.platform(PlatformType.SEV_SNP)
    replaced = bool(snp and find_id_blocks(f, snp.compatibility_mask))
    vcpus, vcpu_type = launch_vcpus(f, plan)
    out, signed, layout, measurement = sign_igvm_measured(
        f, id_key=id_key, author_key=author_key, loader=plan.loader, family_id=plan.family_id,
        image_id=plan.image_id, guest_svn=plan.guest_svn, vcpus=vcpus, vcpu_type=vcpu_type, on_data=on_data)
    return out, SignOutcome(
        output=output,
        loader=plan.loader,
        loader_from=plan.loader_from,
        launch_digest=bytes(signed.fields.ld),
        policy=signed.fields.policy,
        family_id=bytes(signed.fields.family_id),
        image_id=bytes(signed.fields.image_id),
        guest_svn=signed.fields.guest_svn,
        id_key_digest=signed.id_key_digest,
        author_key_digest=signed.author_key_digest,
        replaced=replaced,
        test_key_warning=warning,
        measured=SnpMeasured(loader=plan.loader, vcpus=vcpus, vcpu_type=vcpu_type, measurement=measurement),
    ), layout


#: Bytes of a mapped image hashed by :func:`_sha256_chunks` before they leave the resident set.
_SHA256_WINDOW = 8 << 20


def _sha256_chunks(f: IgvmFile, layout: Layout | None = None) -> tuple[str, int]:
    """SHA-256 and size of ``f``'s bytes: of ``layout`` (``f``'s serialization, already made by
    the caller) when given, else of a new one.  The parts of a mapped file (blobs that are
    windows of a read-only mmap, as a loaded image's pages are) leave the resident set once
    hashed, every :data:`_SHA256_WINDOW` bytes (:func:`~igvm_builder.format.blob.dontneed`):
    the image is never resident as a whole."""
    import hashlib
    import mmap

    from igvm_builder.format.blob import FileSlice, as_view, dontneed

    h = hashlib.sha256()
    size = 0
    if layout is None:
        for chunk in f.iter_chunks():
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size
    h.update(layout.head)
    size = len(layout.head)
    window = _SHA256_WINDOW
    src: mmap.mmap | None = None  # the mapping of the bytes hashed since the last release: [lo, hi)
    lo = hi = 0
    for blob in layout.blobs:
        view = as_view(blob)
        n = len(view)
        size += n
        source = view.obj if type(blob) is FileSlice else None
        if not isinstance(source, mmap.mmap) or not view.readonly:  # (a private mapping keeps its pages)
            h.update(view)
            continue
        assert isinstance(blob, FileSlice)
        for off in range(0, n, window):
            h.update(view[off : off + window])
            start, end = blob.start + off, blob.start + min(n, off + window)
            if source is not src:
                if src is not None:
                    dontneed(src, lo, hi - lo)
                src, lo, hi = source, start, end
            else:
                lo, hi = min(lo, start), max(hi, end)
            if hi - lo >= window:
                dontneed(source, lo, hi - lo)
                src = None
    if src is not None:
        dontneed(src, lo, hi - lo)
    return h.hexdigest(), size


def _measurements(signed: IgvmFile, outcome: SignOutcome, *, tdx_two_pass: bool, vcpus: int | None,
                  vcpu_type: str | int | None) -> list[Measurement]:
    """Every platform's measurement of ``signed`` for its reference values: SEV-SNP's taken from
    the signing (``outcome.measured``) when it is that launch's (loader, vCPUs, mask; the ID block
    is not measured, so the file signed measures as the file the digest was taken of), the rest
    measured here."""
    from igvm_builder.format.defs import PlatformType
    from igvm_builder.measure.engine import measure_file

    snp = signed.platform(PlatformType.SEV_SNP)
    kept = outcome.measured
    reuse = kept is not None and snp is not None and kept.serves(outcome.loader, vcpus, vcpu_type,
                                                                   snp.compatibility_mask)
    if not reuse:
        return list(measure_file(signed, loader=outcome.loader, tdx_two_pass=tdx_two_pass, vcpus=vcpus,
                                 vcpu_type=vcpu_type))
    assert kept is not None
    rest = [p.platform_type for p in signed.platforms if p.platform_type != PlatformType.SEV_SNP]
    measured = measure_file(signed, platforms=rest, loader=outcome.loader, tdx_two_pass=tdx_two_pass,
                            vcpus=vcpus, vcpu_type=vcpu_type) if rest else ()
    return [kept.measurement, *measured]


def _hash_and_measure(signed: IgvmFile, outcome: SignOutcome, layout: Layout | None, *, tdx_two_pass: bool,
                      vcpus: int | None, vcpu_type: str | int | None) -> tuple[str, int, list[Measurement]]:
    """The signed file's SHA-256 and size, and its platforms' measurements (:func:`_measurements`):
    the SHA-256 in a thread of its own while the platforms signing did not measure are measured
    (hashlib lets both run at once)."""
    from igvm_builder.format.defs import PlatformType

    if all(p.platform_type == PlatformType.SEV_SNP for p in signed.platforms) and outcome.measured is not None:
        sha256, size = _sha256_chunks(signed, layout)  # (likely nothing left to measure)
        return sha256, size, _measurements(signed, outcome, tdx_two_pass=tdx_two_pass, vcpus=vcpus,
                                           vcpu_type=vcpu_type)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="igvm-sha256") as pool:
        job = pool.submit(_sha256_chunks, signed, layout)
        measurements = _measurements(signed, outcome, tdx_two_pass=tdx_two_pass, vcpus=vcpus, vcpu_type=vcpu_type)
        sha256, size = job.result()
    return sha256, size, measurements


def signed_reference_values(
    signed: IgvmFile, outcome: SignOutcome, *, unsigned: tuple[str, int], base: ReferenceValues | None = None,
    vcpus: int | None = None, vcpu_type: str | int | None = None, layout: Layout | None = None,
) -> ReferenceValues:
    """The reference values of the signed image: its file and platform entries (with the ID
    block's fields and key digests), what was signed (:class:`~igvm_builder.reference.SignatureRef`,
    with ``unsigned`` = the SHA-256 and size of the image before signing, what a rebuild gives),
    and, from ``base`` (the build's reference values of that image), the inputs and build
    parameters.  SigningError when ``base`` describes another file than the one signed."""
    from igvm_builder.measure.report import reference_values
    from igvm_builder.reference import FileRef, ReferenceValues, SignatureRef

    if base is not None:
        expected = base.signature.unsigned_file if base.signature is not None else base.file
        if expected is None or expected.sha256 != unsigned[0]:
            if expected is None:
                raise SigningError("the reference values given record no file SHA-256: give the build's "
                                   "(igvm-builder build --reference-values)")
            raise SigningError(f"the reference values given describe a file with sha256 {expected.sha256[:16]}..., "
                               f"not the image signed ({unsigned[0][:16]}...)")
    tdx = base.platforms.get("tdx") if base is not None else None
    two_pass = bool(tdx is not None and tdx.details.get("pass_order") == "two-pass")
    sha256, size, measurements = _hash_and_measure(signed, outcome, layout, tdx_two_pass=two_pass, vcpus=vcpus,
                                                   vcpu_type=vcpu_type)
    doc = reference_values(signed, sha256, loader=outcome.loader, tdx_two_pass=two_pass, file_size=size,
                           vcpus=vcpus, vcpu_type=vcpu_type, measurements=measurements)
    measured = ReferenceValues.from_dict(doc)
    signature = SignatureRef(
        unsigned_file=FileRef(*unsigned), loader=outcome.loader, launch_digest=outcome.launch_digest.hex(),
        policy=f"{outcome.policy:#x}", family_id=outcome.family_id.hex(), image_id=outcome.image_id.hex(),
        guest_svn=outcome.guest_svn, id_key_digest=outcome.id_key_digest.hex(),
        author_key_digest=outcome.author_key_digest.hex() if outcome.author_key_digest is not None else None,
        vcpus=vcpus, vcpu_type=vcpu_type,
    )
    if base is not None:
        return base.with_signature(measured.file, measured.platforms, signature)
    return ReferenceValues(file=measured.file, platforms=measured.platforms, signature=signature)
