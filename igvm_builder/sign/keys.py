"""Key sources for SEV-SNP ID and author keys: one interface, several back ends.

Every source signs with ECDSA P-384 over SHA-384 of the message (what the SNP
firmware verifies) and returns the integers ``(r, s)``.  :meth:`KeySource.sign`
verifies every signature with the source's public key before returning it.

=========================  ==================================================  ==============
spec string                source                                              deterministic
=========================  ==================================================  ==============
``file:PATH`` or ``PATH``  :class:`PemFileKey` (SEC1 / PKCS#8, PEM / DER)      yes (RFC 6979)
``env:VAR``                :class:`EnvPemKey` (PEM text in an env variable)    yes (RFC 6979)
``pkcs11:...``             :class:`Pkcs11Key` (RFC 7512 URI, python-pkcs11)    no (token RNG)
``cmd:ARGV``               :class:`CommandKey` (external signer, see its doc)  not assumed
=========================  ==================================================  ==============

The two-step flow (export what to sign, sign elsewhere, import the signatures) is
in :mod:`igvm_builder.sign.twostep` (also exported by :mod:`igvm_builder.sign`).

No private key material (PEM text, DER, scalars, passwords, PINs) ever appears in
``description``, ``str``/``repr`` or an exception message.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from igvm_builder.errors import SigningError
from igvm_builder.recordclass import field, record
from igvm_builder.sign import _ecdsa
from igvm_builder.sign._ecdsa import decode_signature

__all__ = [
    "PKCS11_MODULE_ENV",
    "PKCS11_PIN_ENV",
    "CommandKey",
    "EnvPemKey",
    "InMemoryKey",
    "KeySource",
    "PemFileKey",
    "Pkcs11Key",
    "Pkcs11Uri",
    "decode_signature",
    "key_source_from_spec",
    "parse_pkcs11_uri",
]

#: Environment variable naming the PKCS#11 module when the URI has no ``module-path``.
PKCS11_MODULE_ENV = "IGVM_PKCS11_MODULE"
#: Environment variable holding the token PIN when the URI has neither ``pin-value`` nor ``pin-source``.
PKCS11_PIN_ENV = "IGVM_PKCS11_PIN"

_T = TypeVar("_T")

PublicKeyInput = _ecdsa.PublicKey | bytes | str | os.PathLike[str]


class KeySource(ABC):
    """A P-384 signing key, wherever it lives.

    Subclasses implement :attr:`description`, :meth:`public_key` and
    :meth:`_sign`; :meth:`sign` adds the verification every caller relies on.
    """

    #: True if signing the same message twice gives the same signature (RFC 6979).
    deterministic: bool = False

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the key is, e.g. ``file:keys/id.pem`` (safe to print; never key material)."""

    @abstractmethod
    def public_key(self) -> _ecdsa.PublicKey:
        """The EC P-384 public key (SigningError for a wrong key type or curve)."""

    @abstractmethod
    def _sign(self, message: bytes, digest: bytes) -> tuple[int, int]:
        """Return (r, s) for ``message``; ``digest`` is its SHA-384."""

    def sign(self, message: bytes) -> tuple[int, int]:
        """ECDSA P-384 over SHA-384 of ``message``; returns ``(r, s)``, verified with :meth:`public_key`."""
        message = bytes(message)
        public_key = self.public_key()
        r, s = self._sign(message, _ecdsa.sha384(message))
        if not _ecdsa.verify_message(public_key, r, s, message):
            raise SigningError(
                "the signature returned by the key source does not verify with its public key "
                "(wrong public key, wrong digest, or a faulty signer)",
                source=self.description,
            )
        return r, s

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    def __str__(self) -> str:
        return self.description


def _public_key_from_input(value: PublicKeyInput, *, source: str) -> _ecdsa.PublicKey:
    """A P-384 public key from a key object, PEM/DER bytes, PEM text, or a file path."""
    if isinstance(value, _ecdsa.PublicKey):
        return _ecdsa.require_p384_public(value, source)
    if isinstance(value, bytes):
        return _ecdsa.load_public_key(value, source=source)
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return _ecdsa.load_public_key(value.encode("ascii"), source=source)
    if isinstance(value, str | os.PathLike):
        from igvm_builder.io import KEY_LIMIT, read_input

        path = Path(value)
        data = read_input(path, "public key file", limit=KEY_LIMIT, error=SigningError)
        return _ecdsa.load_public_key(data, source=str(path))
    raise SigningError(f"unsupported public key value of type {type(value).__name__}", source=source)


def _password_bytes(password: bytes | str | None) -> bytes | None:
    if password is None or isinstance(password, bytes):
        return password
    return password.encode("utf-8")


class _SoftwareKey(KeySource):
    """Shared logic of keys whose private part is loaded into this process."""

    deterministic = True

    def __init__(self, *, public_key: PublicKeyInput | None = None) -> None:
        self._private: _ecdsa.PrivateKey | None = None
        self._expected_public = public_key

    @abstractmethod
    def _load(self) -> _ecdsa.PrivateKey:
        """Load and return the P-384 private key."""

    def _private_key(self) -> _ecdsa.PrivateKey:
        if self._private is None:
            key = self._load()
            if self._expected_public is not None:
                expected = _public_key_from_input(self._expected_public, source=self.description)
                if not _ecdsa.same_public_key(expected, key.public_key()):
                    raise SigningError(
                        "the given public key does not match the private key", source=self.description
                    )
            self._private = key
        return self._private

    def public_key(self) -> _ecdsa.PublicKey:
        return self._private_key().public_key()

    def _sign(self, message: bytes, digest: bytes) -> tuple[int, int]:
        return _ecdsa.sign_deterministic(self._private_key(), message, source=self.description)


class InMemoryKey(_SoftwareKey):
    """A ``cryptography`` EC P-384 private key object already in memory (RFC 6979 signing)."""

    def __init__(self, private_key: object, *, description: str = "in-memory key") -> None:
        super().__init__()
        self._description = description
        self._private = _ecdsa.require_p384_private(private_key, description)

    @property
    def description(self) -> str:
        return self._description

    def _load(self) -> _ecdsa.PrivateKey:  # pragma: no cover - the key is set in __init__
        raise SigningError("in-memory key was cleared", source=self._description)


class PemFileKey(_SoftwareKey):
    """A private key file: SEC1 (``EC PRIVATE KEY``) or PKCS#8, PEM or DER, optionally encrypted.

    Signs deterministically (RFC 6979); never falls back to random nonces.  The file
    is read on first use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        password: bytes | str | None = None,
        public_key: PublicKeyInput | None = None,
    ) -> None:
        super().__init__(public_key=public_key)
        self.path = Path(path)
        self._password = _password_bytes(password)

    @property
    def description(self) -> str:
        return f"file:{self.path}"

    def _load(self) -> _ecdsa.PrivateKey:
        from igvm_builder.io import KEY_LIMIT, read_input

        try:
            data = read_input(self.path, "key file", limit=KEY_LIMIT, error=SigningError)
        except SigningError as exc:  # named as the key source, file:PATH
            raise SigningError(exc.message, source=self.description) from None
        return _ecdsa.load_private_key(data, password=self._password, source=self.description)


class EnvPemKey(_SoftwareKey):
    """A private key in an environment variable (CI secrets).

    The value is PEM text (SEC1 or PKCS#8; ``\\n`` escapes on a single line are
    accepted) or base64 of the DER encoding.  It is read on first use and never
    stored as text.  Signs deterministically (RFC 6979).
    """

    def __init__(
        self,
        var: str,
        *,
        password: bytes | str | None = None,
        public_key: PublicKeyInput | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(public_key=public_key)
        if not var:
            raise SigningError("empty environment variable name", source="env:")
        self.var = var
        self._password = _password_bytes(password)
        self._environ = environ

    @property
    def description(self) -> str:
        return f"env:{self.var}"

    def _load(self) -> _ecdsa.PrivateKey:
        environ = os.environ if self._environ is None else self._environ
        text = environ.get(self.var, "").strip()
        if not text:
            raise SigningError("the environment variable is not set or empty", source=self.description)
        if "-----BEGIN" in text:
            if "\n" not in text and "\\n" in text:
                text = text.replace("\\n", "\n")
            data = text.encode("ascii", "replace")
        else:
            try:
                data = base64.b64decode("".join(text.split()), validate=True)
            except ValueError:
                raise SigningError(
                    "the environment variable holds neither PEM text nor base64 DER", source=self.description
                ) from None
        return _ecdsa.load_private_key(data, password=self._password, source=self.description)


# --------------------------------------------------------------------------------------------
# External command


#: Bytes of standard output a signer command may print (a signature or a public key needs a few
#: KiB; a signer that prints more is stopped, so endless output cannot exhaust memory).
SIGNER_OUTPUT_LIMIT = 1 << 20


def _stderr_summary(stderr_bytes: int) -> str:
    """What an error says about a failed signer's standard error: only how much there was.

    Its content is never repeated (a signer's diagnostics can carry a PIN, a token or key
    material); run the command by hand to read it."""
    if not stderr_bytes:
        return " (it wrote nothing to stderr)"
    return f" (it wrote {stderr_bytes} bytes to stderr, not shown: they may hold secrets; run the command to see them)"


def _run_bounded(argv: Sequence[str], stdin: bytes, env: Mapping[str, str], timeout: float, limit: int
                 ) -> tuple[int | None, bytes, int, str | None]:
    """Run ``argv``; returns (exit status, stdout, stderr byte count, problem).  Standard output
    is kept up to ``limit`` bytes and standard error is counted, never kept; a command that
    prints more than ``limit`` bytes or runs past ``timeout`` is killed (``problem`` says which)."""
    import threading

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err_count = [0]
    problem: list[str] = []

    def pump_out() -> None:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            if len(out) + len(chunk) > limit:
                problem.append(f"printed more than {limit} bytes on stdout")
                proc.kill()
                break
            out.extend(chunk)

    def pump_err() -> None:
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):
            err_count[0] += len(chunk)

    threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()
    try:
        proc.stdin.write(stdin)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
    try:
        status: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        problem.append(f"did not finish within {timeout:g} s")
        status = None
    for t in threads:
        t.join(timeout=5)
    proc.stdout.close()
    proc.stderr.close()
    return status, bytes(out), err_count[0], (problem[0] if problem else None)


class CommandKey(KeySource):
    """An external signer command (KMS, HSM CLI, signing service, ...).

    Protocol (no shell is involved; ``argv`` is run as given):

    **Signing.**  igvm-builder runs ``argv`` with

    * stdin: the SHA-384 digest to sign, 96 lowercase hex characters and ``\\n``;
    * environment (in addition to the inherited one):

      - ``IGVM_SIGN_OPERATION=sign``
      - ``IGVM_SIGN_ALGORITHM=ECDSA_P384_SHA384``
      - ``IGVM_SIGN_DIGEST_HEX`` -- the same digest, hex
      - ``IGVM_SIGN_DIGEST_B64`` -- the same digest, standard base64
      - ``IGVM_SIGN_DIGEST_FILE`` -- path of a file holding the 48 raw digest bytes
      - ``IGVM_SIGN_MESSAGE_FILE`` -- path of a file holding the message itself (the
        96-byte ID block or the 0x404-byte SEV ID key), for signers that hash themselves

      (the files live in a private temporary directory removed afterwards);

    * stdout: one signature, either DER ``ECDSA-Sig-Value`` or raw ``r || s`` (96
      bytes, big-endian), as binary, hex, or base64 (standard or URL-safe);
      surrounding whitespace is ignored;
    * exit status 0; anything else is a SigningError that says how many bytes the command wrote
      to stderr but never what (a signer's diagnostics can hold a PIN or key material);
    * at most :data:`SIGNER_OUTPUT_LIMIT` bytes on stdout (more: the command is killed, an error).

    Errors name the command by its program's file name only (``cmd:NAME``): its arguments
    are never repeated, since they can carry a PIN or a token.

    The signature is the ECDSA P-384 signature over the *digest* (i.e. "sign
    prehashed SHA-384").  Examples::

        # AWS KMS (prints base64 DER)
        cmd:sh -c 'aws kms sign --key-id alias/snp-id --signing-algorithm ECDSA_SHA_384
            --message-type DIGEST --message fileb://"$IGVM_SIGN_DIGEST_FILE"
            --query Signature --output text'
        # OpenSSL with a key it can reach (binary DER)
        cmd:sh -c 'openssl pkeyutl -sign -inkey key.pem -in "$IGVM_SIGN_DIGEST_FILE"'

    **Public key.**  Either given (``public_key``: a key object, PEM/DER bytes, PEM
    text or a file path of a SubjectPublicKeyInfo or X.509 certificate), or printed
    by the command: igvm-builder runs ``argv + ["--public-key"]`` with
    ``IGVM_SIGN_OPERATION=public-key`` and empty stdin, and reads a PEM (or DER)
    SubjectPublicKeyInfo or certificate from stdout.  (Wrappers such as
    ``sh -c '...'`` receive ``--public-key`` as ``$0`` and can test
    ``$IGVM_SIGN_OPERATION`` instead.)

    ``deterministic`` states whether the signer uses RFC 6979 (default False: the
    bytes of the signature are not reproducible, but they always verify).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        public_key: PublicKeyInput | None = None,
        deterministic: bool = False,
        timeout: float = 300.0,
    ) -> None:
        if isinstance(argv, str | bytes) or not argv or not all(isinstance(a, str) for a in argv):
            raise SigningError("signer command must be a non-empty sequence of strings", source="cmd:")
        self.argv = tuple(argv)
        self.deterministic = deterministic
        self.timeout = timeout
        self._public_input = public_key
        self._public: _ecdsa.PublicKey | None = None

    @property
    def description(self) -> str:
        # the program's file name only: arguments (and a path) can carry a PIN or a token
        return f"cmd:{os.path.basename(self.argv[0]) or 'signer'}"

    def _run(self, operation: str, args: Sequence[str], stdin: bytes, env: Mapping[str, str]) -> bytes:
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["IGVM_SIGN_OPERATION"] = operation
        try:
            status, out, err_bytes, problem = _run_bounded(
                [*self.argv, *args], stdin, full_env, self.timeout, SIGNER_OUTPUT_LIMIT)
        except FileNotFoundError:
            raise SigningError("signer command not found", source=self.description) from None
        except PermissionError:
            raise SigningError("signer command is not executable", source=self.description) from None
        except OSError as exc:
            raise SigningError(f"cannot run signer command: {exc.strerror}", source=self.description) from None
        if problem is not None:
            raise SigningError(f"signer command ({operation}) {problem}; it was stopped", source=self.description)
        if status != 0:
            raise SigningError(
                f"signer command ({operation}) exited with status {status}{_stderr_summary(err_bytes)}",
                source=self.description,
            )
        return out

    def public_key(self) -> _ecdsa.PublicKey:
        if self._public is None:
            if self._public_input is not None:
                self._public = _public_key_from_input(self._public_input, source=self.description)
            else:
                out = self._run("public-key", ["--public-key"], b"", {})
                if not out.strip():
                    raise SigningError("signer command printed no public key", source=self.description)
                self._public = _ecdsa.load_public_key(out, source=self.description)
        return self._public

    def _sign(self, message: bytes, digest: bytes) -> tuple[int, int]:
        digest_hex = digest.hex()
        from igvm_builder.io import ScratchDirectory

        with ScratchDirectory("igvm-sign-") as tmp:  # (a killed run's are removed first)
            digest_file = Path(tmp, "digest.bin")
            message_file = Path(tmp, "message.bin")
            digest_file.write_bytes(digest)
            message_file.write_bytes(message)
            out = self._run(
                "sign",
                [],
                (digest_hex + "\n").encode("ascii"),
                {
                    "IGVM_SIGN_ALGORITHM": "ECDSA_P384_SHA384",
                    "IGVM_SIGN_DIGEST_HEX": digest_hex,
                    "IGVM_SIGN_DIGEST_B64": base64.b64encode(digest).decode("ascii"),
                    "IGVM_SIGN_DIGEST_FILE": str(digest_file),
                    "IGVM_SIGN_MESSAGE_FILE": str(message_file),
                },
            )
        try:
            return decode_signature(out)
        except SigningError as exc:
            raise SigningError(f"signer command output: {exc.message}", source=self.description) from None


# --------------------------------------------------------------------------------------------
# PKCS#11 (RFC 7512 URIs)

_PATH_ATTRS = {"token", "manufacturer", "serial", "model", "object", "id", "type"}
_QUERY_ATTRS = {"pin-value", "pin-source", "module-path"}

_EC_PARAMS_P384 = bytes.fromhex("06052b81040022")
_EC_PARAMS_NAMES = {
    bytes.fromhex("06082a8648ce3d030107"): "EC P-256 (secp256r1)",
    _EC_PARAMS_P384: "EC P-384 (secp384r1)",
    bytes.fromhex("06052b81040023"): "EC P-521 (secp521r1)",
    bytes.fromhex("06052b8104000a"): "EC secp256k1",
    bytes.fromhex("06082a8648ce3d030101"): "EC P-192 (secp192r1)",
    bytes.fromhex("06052b81040021"): "EC P-224 (secp224r1)",
}


@record(kw_only=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 ``pkcs11:`` URI that :class:`Pkcs11Key` uses.

    Path attributes: ``token``, ``manufacturer``, ``serial``, ``model`` (select the
    token), ``object`` (CKA_LABEL), ``id`` (CKA_ID, percent-encoded bytes), ``type``
    (only ``private``).  Query attributes: ``pin-value``, ``pin-source`` (a file
    path or ``file:`` URI whose first line is the PIN), ``module-path``.  Any other
    attribute is rejected rather than silently ignored.
    """

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    pin_source: str | None = None
    module_path: str | None = None

    def redacted(self) -> str:
        """The URI with ``pin-value`` replaced by ``***`` (safe to print)."""
        path = []
        for name in ("token", "manufacturer", "serial", "model", "object"):
            value = getattr(self, name)
            if value is not None:
                path.append(f"{name}={urllib.parse.quote(value, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        if self.type is not None:
            path.append(f"type={self.type}")
        query = []
        if self.pin_value is not None:
            query.append("pin-value=***")
        if self.pin_source is not None:
            query.append(f"pin-source={urllib.parse.quote(self.pin_source, safe='/:')}")
        if self.module_path is not None:
            query.append(f"module-path={urllib.parse.quote(self.module_path, safe='/')}")
        text = "pkcs11:" + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 ``pkcs11:`` URI (see :class:`Pkcs11Uri` for what is supported)."""
    source = "pkcs11 URI"
    if not uri.lower().startswith("pkcs11:"):
        raise SigningError("a PKCS#11 URI must start with 'pkcs11:'", source=source)
    rest = uri[len("pkcs11:") :]
    path_part, _, query_part = rest.partition("?")
    values: dict[str, bytes] = {}

    def add(items: str, sep: str, allowed: set[str], where: str) -> None:
        for item in items.split(sep):
            if not item:
                continue
            name, eq, value = item.partition("=")
            name = name.strip().lower()
            if not eq:
                raise SigningError(f"PKCS#11 URI {where} attribute '{name}' has no value", source=source)
            if name not in allowed:
                other = "query" if where == "path" else "path"
                if name in (_QUERY_ATTRS if where == "path" else _PATH_ATTRS):
                    hint = f" (it belongs in the {other} part)"
                else:
                    hint = ""
                raise SigningError(f"unsupported PKCS#11 URI {where} attribute '{name}'{hint}", source=source)
            if name in values:
                raise SigningError(f"PKCS#11 URI attribute '{name}' given twice", source=source)
            values[name] = urllib.parse.unquote_to_bytes(value)

    add(path_part, ";", _PATH_ATTRS, "path")
    add(query_part, "&", _QUERY_ATTRS, "query")

    def text(name: str) -> str | None:
        raw = values.get(name)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SigningError(f"PKCS#11 URI attribute '{name}' is not UTF-8", source=source) from None

    kind = text("type")
    if kind is not None and kind != "private":
        raise SigningError(f"PKCS#11 URI type={kind}: a signing key must be type=private", source=source)
    if "pin-value" in values and "pin-source" in values:
        raise SigningError("PKCS#11 URI gives both pin-value and pin-source", source=source)
    return Pkcs11Uri(
        token=text("token"),
        manufacturer=text("manufacturer"),
        serial=text("serial"),
        model=text("model"),
        object=text("object"),
        id=values.get("id"),
        type=kind,
        pin_value=text("pin-value"),
        pin_source=text("pin-source"),
        module_path=text("module-path"),
    )


#: Lengths of a bare P-384 point (X9.62): uncompressed ``04 || X || Y``, compressed ``02|03 || X``.
_P384_POINT_LENGTHS = {97: (4,), 49: (2, 3)}


def ec_public_key_from_token(ec_params: bytes, ec_point: bytes, *, source: str) -> _ecdsa.PublicKey:
    """The public key of a token's CKA_EC_PARAMS and CKA_EC_POINT (needs python-pkcs11).

    PKCS#11 says CKA_EC_POINT is the point wrapped in a DER OCTET STRING, and
    ``pkcs11.util.ec`` decodes that; some tokens store the bare point instead.  The two are
    told apart by length, which is unambiguous for P-384 (a bare point is 97 or 49 bytes, a
    wrapped one 99 or 51): guessing from the first bytes, as an OCTET STRING tag ``04`` and a
    length, misreads a bare uncompressed point whose X starts with 0x5f (1 key in 256).
    """
    from pkcs11 import Attribute
    from pkcs11.util.ec import encode_ec_public_key

    if ec_point[:1] and ec_point[0] in _P384_POINT_LENGTHS.get(len(ec_point), ()):
        return _ecdsa.public_key_from_point(ec_point, source=source)  # a bare point
    try:
        # (encode_ec_public_key reads the two attributes by subscript: a dict serves as the key object)
        der = encode_ec_public_key(cast(Any, {Attribute.EC_PARAMS: ec_params, Attribute.EC_POINT: ec_point}))
    except (ValueError, TypeError, OverflowError) as exc:  # asn1crypto's parse errors
        raise SigningError(f"the token's EC point is neither a DER OCTET STRING nor a bare point: {exc}",
                           source=source) from None
    return _ecdsa.load_public_key(der, source=source)


class Pkcs11Key(KeySource):
    """A key on a PKCS#11 token (HSM, smart card, SoftHSM), addressed by an RFC 7512 URI.

    Example: ``pkcs11:token=snp;object=id-key?pin-source=/run/secrets/pin&module-path=/usr/lib/softhsm/libsofthsm2.so``

    * The module is ``module-path`` from the URI, else ``module_path``, else the
      ``IGVM_PKCS11_MODULE`` environment variable.
    * The PIN is ``pin-value`` or the first line of ``pin-source``, else ``pin``, else
      ``IGVM_PKCS11_PIN``; without one the session is not logged in.
    * The private key is found by ``object`` (label) and/or ``id``; without either,
      the token must hold exactly one private key.
    * The public key comes from ``public_key`` if given, else from the public-key
      object (or certificate) with the same id (or label) on the token.
    * Signing uses ``CKM_ECDSA`` over the SHA-384 digest computed here; the token
      returns raw ``r || s``.  Tokens use random nonces, so ``deterministic`` is False.

    Needs ``python-pkcs11`` (the ``pkcs11`` extra, installed from a checkout or wheel).
    """

    deterministic = False

    def __init__(
        self,
        uri: str,
        *,
        module_path: str | os.PathLike[str] | None = None,
        pin: str | None = None,
        public_key: PublicKeyInput | None = None,
    ) -> None:
        self.uri = parse_pkcs11_uri(uri)
        self._module_arg = os.fspath(module_path) if module_path is not None else None
        self._pin_arg = pin
        self._public_input = public_key
        self._public: _ecdsa.PublicKey | None = None

    @property
    def description(self) -> str:
        return self.uri.redacted()

    def module(self) -> str:
        """The PKCS#11 module path that will be loaded."""
        module = self.uri.module_path or self._module_arg or os.environ.get(PKCS11_MODULE_ENV)
        if not module:
            raise SigningError(
                f"no PKCS#11 module: add module-path=... to the URI or set {PKCS11_MODULE_ENV}",
                source=self.description,
            )
        return module

    def _pin(self) -> str | None:
        if self.uri.pin_value is not None:
            return self.uri.pin_value
        if self.uri.pin_source is not None:
            src = self.uri.pin_source
            if src.startswith("|"):
                raise SigningError("pin-source commands ('|...') are not supported", source=self.description)
            if src.lower().startswith("file:"):
                parsed = urllib.parse.urlparse(src)
                src = urllib.parse.unquote(parsed.path)
            from igvm_builder.io import KEY_LIMIT, read_input

            try:
                lines = read_input(src, "pin-source file", limit=KEY_LIMIT, error=SigningError
                                   ).decode("utf-8").splitlines()
            except (SigningError, UnicodeDecodeError) as exc:
                raise SigningError(f"cannot read pin-source file {src}", source=self.description) from exc
            return lines[0] if lines else ""
        if self._pin_arg is not None:
            return self._pin_arg
        return os.environ.get(PKCS11_PIN_ENV) or None

    @contextmanager
    def _errors(self) -> Iterator[Any]:
        """Import python-pkcs11 and translate its errors (the one choke point for it)."""
        try:
            import pkcs11
        except ImportError as exc:
            raise SigningError(
                "python-pkcs11 is not installed: install igvm-builder with its pkcs11 extra from a checkout or "
                "wheel (pip install './igvm-builder[pkcs11]')", source=self.description
            ) from exc
        try:
            yield pkcs11
        except pkcs11.exceptions.PinIncorrect as exc:
            raise SigningError(
                "the token rejected the PIN (CKR_PIN_INCORRECT)", source=self.description
            ) from exc
        except pkcs11.exceptions.PinLocked as exc:
            raise SigningError("the token's PIN is locked (CKR_PIN_LOCKED)", source=self.description) from exc
        except pkcs11.exceptions.UserNotLoggedIn as exc:
            raise SigningError(
                f"not logged in: give pin-value= or pin-source= in the URI, or set {PKCS11_PIN_ENV}",
                source=self.description,
            ) from exc
        except pkcs11.exceptions.PKCS11Error as exc:
            detail = str(exc).strip()
            text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
            if "loading" in detail:
                text = f"cannot load PKCS#11 module {self.module()}"
            raise SigningError(f"PKCS#11 error ({text}; module {self.module()})", source=self.description) from exc

    def _find_token(self, pkcs11: Any, lib: Any) -> Any | None:
        uri = self.uri
        matches = []
        for slot in lib.get_slots(token_present=True):
            token = slot.get_token()
            if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                continue  # e.g. SoftHSM's spare uninitialized slot
            serial = (
                token.serial.decode("ascii", "replace") if isinstance(token.serial, bytes) else token.serial
            )
            if uri.token is not None and token.label.strip() != uri.token:
                continue
            if uri.serial is not None and str(serial).strip() != uri.serial:
                continue
            if uri.manufacturer is not None and token.manufacturer_id.strip() != uri.manufacturer:
                continue
            if uri.model is not None and token.model.strip() != uri.model:
                continue
            matches.append(token)
        if len(matches) > 1:
            labels = ", ".join(repr(t.label.strip()) for t in matches)
            raise SigningError(
                f"{len(matches)} tokens match ({labels}); add token= or serial= to the URI",
                source=self.description,
            )
        return matches[0] if matches else None

    def _load(self, pkcs11: Any) -> Any:
        """The loaded module; a module that cannot be loaded or initialized is one clear line
        naming the module path tried (and, for SoftHSM, the SOFTHSM2_CONF it read)."""
        module = self.module()
        try:
            return pkcs11.lib(module)
        except pkcs11.exceptions.PKCS11Error as exc:
            why = type(exc).__name__
            hint = ""
            conf = os.environ.get("SOFTHSM2_CONF")
            if "softhsm" in os.path.basename(module).lower():
                if conf is None:
                    hint = "; SOFTHSM2_CONF is not set (SoftHSM then reads its default configuration)"
                elif not os.path.isfile(conf):
                    hint = f"; SOFTHSM2_CONF={conf} does not exist"
                else:
                    hint = f"; check SOFTHSM2_CONF={conf} and the token directory it names"
            raise SigningError(f"the PKCS#11 module {module} failed to initialize ({why}){hint}",
                               source=self.description) from exc
        except (OSError, RuntimeError) as exc:
            raise SigningError(f"cannot load the PKCS#11 module {module} ({exc})", source=self.description) from exc

    def _tokens_found(self, pkcs11: Any, lib: Any) -> str:
        """The initialized tokens the module shows, for an error message (labels and serials)."""
        found = []
        for slot in lib.get_slots(token_present=True):
            token = slot.get_token()
            if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                continue
            serial = token.serial.decode("ascii", "replace") if isinstance(token.serial, bytes) else token.serial
            found.append(f"'{token.label.strip()}' (serial {str(serial).strip()})")
        return ", ".join(found) if found else "none"

    def _session(self, fn: Callable[[Any, Any], _T]) -> _T:
        with self._errors() as pkcs11:
            lib = self._load(pkcs11)
            token = self._find_token(pkcs11, lib)
            if token is None:
                # Many modules snapshot their slot list at C_Initialize; look again once.
                lib.reinitialize()
                token = self._find_token(pkcs11, lib)
            if token is None:
                raise SigningError(f"no token matches the URI (module {self.module()}; tokens found: "
                                   f"{self._tokens_found(pkcs11, lib)})", source=self.description)
            pin = self._pin()
            with token.open(user_pin=pin) as session:
                return fn(pkcs11, session)

    def _find_private(self, pkcs11: Any, session: Any) -> Any:
        attrs: dict[Any, Any] = {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
        if self.uri.object is not None:
            attrs[pkcs11.Attribute.LABEL] = self.uri.object
        if self.uri.id is not None:
            attrs[pkcs11.Attribute.ID] = self.uri.id
        found = list(session.get_objects(attrs))
        if not found:
            hint = "" if self._pin() is not None else f" (not logged in: give a PIN or set {PKCS11_PIN_ENV})"
            keys = []
            for obj in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}):
                label = obj[pkcs11.Attribute.LABEL]
                key_id = bytes(obj[pkcs11.Attribute.ID] or b"").hex()
                keys.append(f"'{label}'" + (f" (id {key_id})" if key_id else ""))
            seen = f"; private keys on the token: {', '.join(keys)}" if keys else "; no private key is visible"
            raise SigningError(f"no private key matches the URI on the token{hint}{seen}", source=self.description)
        if len(found) > 1:
            raise SigningError(
                f"{len(found)} private keys match the URI; add object= or id=", source=self.description
            )
        key = found[0]
        key_type = key[pkcs11.Attribute.KEY_TYPE]
        if key_type != pkcs11.KeyType.EC:
            name = getattr(key_type, "name", str(key_type))
            raise SigningError(
                f"key is {name}; SEV-SNP ID and author keys must be ECDSA P-384 (secp384r1)",
                source=self.description,
            )
        params = bytes(key[pkcs11.Attribute.EC_PARAMS])
        if params != _EC_PARAMS_P384:
            name = _EC_PARAMS_NAMES.get(params, f"EC with parameters {params.hex()}")
            raise SigningError(
                f"key is {name}; SEV-SNP ID and author keys must be ECDSA P-384 (secp384r1)",
                source=self.description,
            )
        return key

    def _token_public_key(self, pkcs11: Any, session: Any) -> _ecdsa.PublicKey:
        private = self._find_private(pkcs11, session)
        A, OC = pkcs11.Attribute, pkcs11.ObjectClass
        selectors: list[dict[Any, Any]] = []
        key_id = private[A.ID]
        if key_id:
            selectors.append({A.ID: bytes(key_id)})
        label = private[A.LABEL]
        if label:
            selectors.append({A.LABEL: label})
        for selector in selectors:
            publics = list(session.get_objects({A.CLASS: OC.PUBLIC_KEY, **selector}))
            if len(publics) == 1:
                key = ec_public_key_from_token(bytes(publics[0][A.EC_PARAMS]), bytes(publics[0][A.EC_POINT]),
                                               source=self.description)
                return _ecdsa.require_p384_public(key, self.description)
            certs = list(session.get_objects({A.CLASS: OC.CERTIFICATE, **selector}))
            if len(certs) == 1:
                return _ecdsa.load_public_key(bytes(certs[0][A.VALUE]), source=self.description)
        raise SigningError(
            "no public-key object or certificate with the private key's id/label on the token; "
            "import the public key too or give the public key explicitly",
            source=self.description,
        )

    def public_key(self) -> _ecdsa.PublicKey:
        if self._public is None:
            if self._public_input is not None:
                self._public = _public_key_from_input(self._public_input, source=self.description)
            else:
                self._public = self._session(self._token_public_key)
        return self._public

    def _sign(self, message: bytes, digest: bytes) -> tuple[int, int]:
        def run(pkcs11: Any, session: Any) -> bytes:
            key = self._find_private(pkcs11, session)
            return bytes(key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))

        raw = self._session(run)
        if len(raw) == 96:
            return int.from_bytes(raw[:48], "big"), int.from_bytes(raw[48:], "big")
        der = _ecdsa.decode_der_signature(raw)
        if der is None:
            raise SigningError(
                f"the token returned a {len(raw)}-byte signature; expected 96 bytes (r || s)",
                source=self.description,
            )
        return der


# --------------------------------------------------------------------------------------------
# Spec strings


def key_source_from_spec(
    spec: str,
    *,
    password: bytes | str | None = None,
    public_key: PublicKeyInput | None = None,
    pkcs11_module: str | os.PathLike[str] | None = None,
) -> KeySource:
    """Build a key source from a CLI string.

    * ``file:PATH`` or a plain ``PATH`` -> :class:`PemFileKey` (``password`` applies)
    * ``env:VAR`` -> :class:`EnvPemKey` (``password`` applies)
    * ``pkcs11:...`` -> :class:`Pkcs11Key` (``pkcs11_module`` if the URI has no module-path)
    * ``cmd:COMMAND ARGS...`` -> :class:`CommandKey` (split like a POSIX shell, not run by one)

    ``public_key`` (key object, PEM/DER bytes, PEM text or path) is required by
    commands that cannot print their public key; for file/env keys it must match.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SigningError("empty key specification")
    scheme, sep, rest = spec.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme == "pkcs11":
        return Pkcs11Key(spec, module_path=pkcs11_module, public_key=public_key)
    if scheme == "env":
        return EnvPemKey(rest, password=password, public_key=public_key)
    if scheme == "cmd":
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise SigningError(f"cannot split the signer command: {exc}", source="cmd:") from exc
        if not argv:
            raise SigningError("empty signer command", source="cmd:")
        return CommandKey(argv, public_key=public_key)
    if scheme == "file":
        # file:PATH, or a file:// URI (percent-encoded, as RFC 8089 writes it).
        path = urllib.parse.unquote(rest[2:]) if rest.startswith("//") else rest
        if not path:
            raise SigningError("empty key file path", source="file:")
        return PemFileKey(path, password=password, public_key=public_key)
    return PemFileKey(spec, password=password, public_key=public_key)
