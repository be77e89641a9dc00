"""Reference values as a typed, frozen value: :class:`ReferenceValues`.

What a verifier needs to check a launch of an IGVM file and where it came from
(``docs/MEASUREMENT.md``, "Reference values"): the file's SHA-256 and size, each platform's
measurement and what goes with it (policy, guest features, vCPUs, ID block), and for a build
the SHA-256 of every input and the build parameters; for a signed image also what was
signed (:class:`SignatureRef`).  ``build``, ``measure``, ``sign``, ``verify``, ``repro`` and
``verify-release`` all make or read this one type; its JSON form (:meth:`ReferenceValues.to_json`)
is the published document, keys sorted, ``schema_version`` 1.

Per-platform entries keep a typed core (:class:`PlatformRef`: name, mask, algorithm, digest,
loader) and the platform-specific rest as a read-only mapping, since each platform records
different things.  For code written against the JSON document, a ReferenceValues also reads
like that document (``refs["platforms"]["snp"]["digest"]``, ``refs.get("build")``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from igvm_builder.errors import VerificationError
from igvm_builder.recordclass import field, record

__all__ = ["SCHEMA_VERSION", "BuildInfo", "FileRef", "InputRef", "PlatformRef", "ReferenceValues", "SignatureRef"]

SCHEMA_VERSION = 1


def _freeze(obj: Any) -> Any:
    """A read-only deep copy of a JSON value (dicts become mappingproxies, lists tuples)."""
    if isinstance(obj, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list | tuple):
        return tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj: Any) -> Any:
    """The JSON value of a frozen one (mappings become dicts with sorted keys, tuples lists)."""
    if isinstance(obj, Mapping):
        return {k: _thaw(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_thaw(v) for v in obj]
    return obj


def _need(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise VerificationError(f"reference values: {where}{key} is missing or not "
                                f"{getattr(kind, '__name__', 'of the right type')}")
    return value


@record
class FileRef:
    """A file's SHA-256 (64 lowercase hex digits) and size in bytes."""

    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "file.") -> FileRef:
        sha = _need(doc, "sha256", str, where).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise VerificationError(f"reference values: {where}sha256 is not 64 hex digits")
        size = doc.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise VerificationError(f"reference values: {where}size is not a byte count")
        return cls(sha, -1 if size is None else size)


@record
class InputRef:
    """One input of a build: its path as the config names it (relative) and its SHA-256."""

    path: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256}


@record
class BuildInfo:
    """The build parameters: platforms, SEV-SNP loader, notes for the guest owner."""

    platforms: tuple[str, ...]
    loader: str | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"platforms": list(self.platforms), "loader": self.loader, "notes": list(self.notes)}


@record
class PlatformRef:
    """One platform's reference values: typed accessors over the entry as published (which
    round-trips unchanged: each platform records different things, and hand-written
    reference values may hold only some of them)."""

    entry: Mapping[str, Any]

    @property
    def platform(self) -> str | None:
        """``SEV_SNP``, ``TDX``, ... (None when the entry does not say)."""
        value = self.entry.get("platform")
        return value if isinstance(value, str) else None

    @property
    def algorithm(self) -> str | None:
        value = self.entry.get("algorithm")
        return value if isinstance(value, str) else None

    @property
    def digest(self) -> str | None:
        """The launch measurement, lowercase hex (``measurement`` is read as an older spelling)."""
        value = self.entry.get("digest", self.entry.get("measurement"))
        return value.lower() if isinstance(value, str) else None

    @property
    def compatibility_mask(self) -> str | None:
        value = self.entry.get("compatibility_mask")
        return value if isinstance(value, str) else None

    @property
    def loader(self) -> str | None:
        value = self.entry.get("loader")
        return value.lower() if isinstance(value, str) else None

    @property
    def details(self) -> Mapping[str, Any]:
        """Everything but the typed core (policy, guest_features, vcpus, id_block, ...)."""
        core = ("platform", "algorithm", "digest", "compatibility_mask", "loader", "measurement")
        return MappingProxyType({k: v for k, v in self.entry.items() if k not in core})

    def to_dict(self) -> dict[str, Any]:
        return _thaw(self.entry)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], name: str) -> PlatformRef:
        if not isinstance(doc, Mapping):
            if isinstance(doc, str):  # a plain hex string is the digest (verify --reference accepts it)
                return cls(_freeze({"digest": doc}))
            raise VerificationError(f"reference values: platforms.{name} is not an object")
        return cls(_freeze(doc))


@record
class SignatureRef:
    """What the SEV-SNP ID block of a signed image signs, and the image before signing.

    ``unsigned_file`` is the file the build produced (what a rebuild must give); the
    published ``file`` of the :class:`ReferenceValues` is then the signed image.
    """

    unsigned_file: FileRef
    loader: str
    launch_digest: str
    policy: str
    family_id: str
    image_id: str
    guest_svn: int
    id_key_digest: str
    author_key_digest: str | None
    vcpus: int | None = None
    vcpu_type: str | int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "unsigned_file": self.unsigned_file.to_dict(), "loader": self.loader,
            "launch_digest": self.launch_digest, "policy": self.policy, "family_id": self.family_id,
            "image_id": self.image_id, "guest_svn": self.guest_svn, "id_key_digest": self.id_key_digest,
            "author_key_digest": self.author_key_digest,
        }
        if self.vcpus is not None:
            out["vcpus"] = self.vcpus
        if self.vcpu_type is not None:
            out["vcpu_type"] = self.vcpu_type
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> SignatureRef:
        if not isinstance(doc, Mapping):
            raise VerificationError("reference values: signature is not an object")
        unsigned = _need(doc, "unsigned_file", Mapping, "signature.")
        author = doc.get("author_key_digest")
        svn = _need(doc, "guest_svn", int, "signature.")
        vcpus = doc.get("vcpus")
        return cls(
            unsigned_file=FileRef.from_dict(unsigned, "signature.unsigned_file."),
            loader=str(_need(doc, "loader", str, "signature.")).lower(),
            launch_digest=str(_need(doc, "launch_digest", str, "signature.")).lower(),
            policy=str(_need(doc, "policy", str, "signature.")),
            family_id=str(doc.get("family_id", "00" * 16)),
            image_id=str(doc.get("image_id", "00" * 16)),
            guest_svn=svn,
            id_key_digest=str(_need(doc, "id_key_digest", str, "signature.")).lower(),
            author_key_digest=author.lower() if isinstance(author, str) else None,
            vcpus=vcpus if isinstance(vcpus, int) and not isinstance(vcpus, bool) else None,
            vcpu_type=doc.get("vcpu_type") if isinstance(doc.get("vcpu_type"), str | int) else None,
        )


@record
class ReferenceValues(Mapping[str, Any]):
    """The reference values of one IGVM file (schema_version 1); see the module docstring."""

    #: The file's SHA-256 and size (None only in hand-written values that give measurements alone).
    file: FileRef | None
    platforms: Mapping[str, PlatformRef]
    #: Inputs of the build by name ("config", then each input path as the config names it).
    inputs: Mapping[str, InputRef] | None = None
    build: BuildInfo | None = None
    signature: SignatureRef | None = None
    schema_version: int = SCHEMA_VERSION
    _doc: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "platforms", MappingProxyType(dict(self.platforms)))
        if self.inputs is not None:
            object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        self._doc.update(self.to_dict())

    # ---- the JSON document
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (a fresh dict, keys sorted at every level)."""
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "platforms": {name: p.to_dict() for name, p in self.platforms.items()},
        }
        if self.file is not None:
            out["file"] = self.file.to_dict()
        if self.inputs is not None:
            out["inputs"] = {name: i.to_dict() for name, i in self.inputs.items()}
        if self.build is not None:
            out["build"] = self.build.to_dict()
        if self.signature is not None:
            out["signature"] = self.signature.to_dict()
        return _thaw(out)  # type: ignore[no-any-return]

    def to_json(self) -> str:
        """The published document: indented, keys sorted, one trailing newline."""
        import json  # only when the document is written (a build without --reference-values is not)

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ReferenceValues:
        """Parse a reference-values document; VerificationError naming the first bad field."""
        if isinstance(doc, ReferenceValues):
            return doc
        if not isinstance(doc, Mapping):
            raise VerificationError("the reference values are not a JSON object")
        version = doc.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise VerificationError(f"reference values: schema_version {version} is not {SCHEMA_VERSION}")
        file_doc = doc.get("file")
        file = FileRef.from_dict(file_doc) if isinstance(file_doc, Mapping) else None
        plats = doc.get("platforms", {})
        if not isinstance(plats, Mapping):
            raise VerificationError("reference values: platforms is not an object")
        inputs = None
        if isinstance(doc.get("inputs"), Mapping):
            inputs = {str(k): InputRef(str(v.get("path", k)), str(v.get("sha256", "")).lower())
                      for k, v in doc["inputs"].items() if isinstance(v, Mapping)}
        build = None
        if isinstance(doc.get("build"), Mapping):
            b = doc["build"]
            loader = b.get("loader")
            build = BuildInfo(tuple(str(p) for p in b.get("platforms", ()) or ()),
                              loader.lower() if isinstance(loader, str) else None,
                              tuple(str(n) for n in b.get("notes", ()) or ()))
        signature = SignatureRef.from_dict(doc["signature"]) if doc.get("signature") is not None else None
        return cls(file=file, platforms={str(k): PlatformRef.from_dict(v, str(k)) for k, v in plats.items()},
                   inputs=inputs, build=build, signature=signature, schema_version=SCHEMA_VERSION)

    @classmethod
    def from_json(cls, text: str | bytes, source: str | None = None) -> ReferenceValues:
        """Parse the JSON text (bounded nesting, :func:`igvm_builder.io.parse_json`)."""
        from igvm_builder.io import parse_json

        doc = parse_json(text, source=source, error=VerificationError, what="reference values")
        try:
            return cls.from_dict(doc)
        except VerificationError as exc:
            raise (exc.with_source(source) if source else exc) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceValues:
        """Read a published reference-values file (bounded size and nesting, regular files only)."""
        from igvm_builder.io import JSON_LIMIT, read_input

        name = os.fspath(path)
        return cls.from_json(read_input(name, "reference values", limit=JSON_LIMIT, error=VerificationError),
                             source=name)

    # ---- derived views
    @property
    def loader(self) -> str | None:
        """The SEV-SNP loader the values are for (signature, else build, else the SNP entry)."""
        if self.signature is not None:
            return self.signature.loader
        if self.build is not None and self.build.loader:
            return self.build.loader
        snp = self.platforms.get("snp")
        return snp.loader if snp is not None else None

    def with_signature(self, signed_file: FileRef | None, platforms: Mapping[str, PlatformRef],
                       signature: SignatureRef) -> ReferenceValues:
        """These (unsigned) values for the signed image: its file, its platform entries
        (with the ID block), what was signed; inputs and build parameters kept."""
        return ReferenceValues(file=signed_file, platforms=platforms, inputs=self.inputs, build=self.build,
                               signature=signature)

    # ---- read like the JSON document
    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._doc[key])  # the values stay frozen: callers get their own copy

    def __iter__(self) -> Iterator[str]:
        return iter(self._doc)

    def __len__(self) -> int:
        return len(self._doc)
