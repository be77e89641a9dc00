"""``igvm-builder sign IN -o OUT --id-key SPEC``: add or replace the SEV-SNP ID block of an IGVM file.

Three modes:

* one step (default): measure, sign with the key sources, write OUT atomically;
* ``--export-tbs TBS.json``: write the to-be-signed document (public keys only), no IGVM file;
* ``--import-signature TBS.json --id-signature SIG [--author-signature SIG]``: put
  signatures made elsewhere into IN (which must be the exported file) and write OUT.

Test-only keys (``shared/keys``) are refused unless ``--allow-test-keys``.  Only key
digests are printed, never key material.  Key specs: ``docs/SIGNING.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from igvm_builder.commands._common import LOADERS, add_loader_option, print_json
from igvm_builder.commands._vcpus import add_vcpu_options

if TYPE_CHECKING:
    from igvm_builder.format.file import IgvmFile
    from igvm_builder.sign.stage import SignPlan

_MAX_SIGNATURE = 64 * 1024


def _svn(value: str) -> int:
    try:
        svn = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an integer") from None
    if not 0 <= svn <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"{svn} is out of range (0..0xffffffff)")
    return svn


def _id16(value: str) -> bytes:
    from igvm_builder.errors import SigningError
    from igvm_builder.sign.image import parse_id16

    try:
        return parse_id16(value, "the value")
    except SigningError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="IGVM file with an SEV_SNP platform (any producer)")
    parser.add_argument("-o", "--output", metavar="OUT", help="signed IGVM file to write (atomically)")
    parser.add_argument(
        "--id-key", metavar="SPEC", help="ID key source: PATH, file:PATH, env:VAR, pkcs11:URI or cmd:COMMAND"
    )
    parser.add_argument("--author-key", metavar="SPEC", help="author key source (same forms as --id-key)")
    add_loader_option(parser, "loader profile of the launch digest to sign (default: the config's "
                              "image.loader with --config, else hyperv)")
    add_vcpu_options(parser, "the config's snp.vcpus with --config, else the file's VP contexts")
    parser.add_argument("--family-id", type=_id16, metavar="HEX", help="FAMILY_ID, 32 hex digits")
    parser.add_argument("--image-id", type=_id16, metavar="HEX", help="IMAGE_ID, 32 hex digits")
    parser.add_argument("--guest-svn", type=_svn, metavar="N", help="GUEST_SVN (default 0)")
    parser.add_argument(
        "--config", metavar="CONFIG", help="build config: defaults from its [sign] table and image.loader"
    )
    parser.add_argument(
        "--export-tbs", metavar="TBS.json", help="write the to-be-signed document (no IGVM file is written)"
    )
    parser.add_argument(
        "--import-signature", metavar="TBS.json", help="the to-be-signed document the signatures are for"
    )
    parser.add_argument(
        "--id-signature",
        metavar="SIG",
        help="ID key's signature over to_sign[id_block] (file, or - for stdin)",
    )
    parser.add_argument(
        "--author-signature", metavar="SIG", help="author key's signature over to_sign[id_key] (file or -)"
    )
    parser.add_argument(
        "--allow-test-keys", action="store_true", help="allow the public TEST-ONLY keys (tests only)"
    )
    parser.add_argument(
        "--remove", action="store_true",
        help="remove the SEV-SNP ID block instead of signing (the launch digest does not change)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (schema: docs/JSON.md)")
    parser.add_argument(
        "--reference-values", metavar="OUT.json",
        help="also write the signed image's reference values (ID block fields, key digests, what was signed); "
             "with --reference, its inputs and build parameters too: what verify-release --igvm needs")
    parser.add_argument(
        "--reference", metavar="REF.json",
        help="the build's reference values of IN (igvm-builder build --reference-values), extended by "
             "--reference-values")
    parser.set_defaults(_sign_parser=parser)


def _usage(args: argparse.Namespace, message: str) -> NoReturn:
    args._sign_parser.error(message)  # exits with status 2
    raise AssertionError("unreachable")  # pragma: no cover


def _check_usage(args: argparse.Namespace) -> None:
    if args.remove:
        given = [opt for opt, value in (
            ("--id-key", args.id_key), ("--author-key", args.author_key), ("--family-id", args.family_id),
            ("--image-id", args.image_id), ("--guest-svn", args.guest_svn), ("--config", args.config),
            ("--export-tbs", args.export_tbs), ("--import-signature", args.import_signature),
            ("--id-signature", args.id_signature), ("--author-signature", args.author_signature),
            ("--loader", args.loader), ("--vcpus", args.vcpus), ("--vcpu-type", args.vcpu_type),
            ("--reference-values", args.reference_values), ("--reference", args.reference))
            if value is not None]
        if given:
            _usage(args, f"--remove signs nothing: do not give {', '.join(given)}")
        if not args.output:
            _usage(args, "-o/--output is required")
        return
    if args.reference and not args.reference_values:
        _usage(args, "--reference is the build's reference values that --reference-values extends: give both")
    if args.reference_values and args.export_tbs:
        _usage(args, "--export-tbs signs nothing yet: give --reference-values with --import-signature")
    if args.export_tbs and args.import_signature:
        _usage(args, "--export-tbs and --import-signature are the two halves of the flow: give one")
    if args.export_tbs:
        if args.output:
            _usage(args, "--export-tbs writes the to-be-signed document and no IGVM file: drop -o")
    elif not args.output:
        _usage(args, "-o/--output is required")
    if args.import_signature:
        given = [
            opt
            for opt, value in (
                ("--id-key", args.id_key),
                ("--author-key", args.author_key),
                ("--family-id", args.family_id),
                ("--image-id", args.image_id),
                ("--guest-svn", args.guest_svn),
                ("--config", args.config),
            )
            if value is not None
        ]
        if given:
            _usage(
                args,
                f"--import-signature takes the keys and ID block fields from the document; "
                f"do not give {', '.join(given)}",
            )
        if not args.id_signature:
            _usage(args, "--import-signature needs --id-signature")
        if args.id_signature == "-" and args.author_signature == "-":
            _usage(args, "only one of --id-signature and --author-signature can read standard input")
    elif args.id_signature or args.author_signature:
        _usage(args, "--id-signature/--author-signature go with --import-signature")


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that is one of the inputs (the IGVM file, the config,
    the document, a signature or key file): sign writes a new file, never over what it reads."""
    from igvm_builder.io import check_distinct

    inputs = [args.input]
    for value in (args.config, args.import_signature, args.id_signature, args.author_signature, args.reference):
        if value and value != "-":
            inputs.append(value)
    for spec in (args.id_key, args.author_key):
        if spec:
            scheme, sep, rest = spec.partition(":")
            path = rest if sep and scheme.lower() == "file" else spec
            if os.path.exists(path):
                inputs.append(path)
    check_distinct([p for p in (args.output, args.export_tbs, args.reference_values) if p], inputs)


def _read_signature(path: str, what: str) -> bytes:
    from igvm_builder.errors import SigningError

    if path == "-":
        data = sys.stdin.buffer.read(_MAX_SIGNATURE + 1)
    else:
        from igvm_builder.io import open_input

        with open_input(path, what, error=SigningError) as fh:  # a regular file: a FIFO would block
            data = fh.read(_MAX_SIGNATURE + 1)
    if len(data) > _MAX_SIGNATURE or not data.strip():
        raise SigningError(f"the {what} is empty or too large to be a signature", source=path)
    return data


def _refuse_test_keys(args: argparse.Namespace, digests: dict[str, bytes | None]) -> str | None:
    """SigningError for a TEST-ONLY key unless --allow-test-keys; else the warning to print on success."""
    from igvm_builder.sign.stage import check_test_keys

    return check_test_keys(digests, allow=args.allow_test_keys, how_to_allow="pass --allow-test-keys")


def _key_lines(id_digest: bytes, author_digest: bytes | None) -> list[str]:
    return [
        f"  ID key digest:     {id_digest.hex()}",
        f"  author key digest: {author_digest.hex() if author_digest is not None else 'none'}",
    ]


def _warn(warning: str | None) -> None:
    if warning:
        print(f"igvm-builder sign: warning: {warning}", file=sys.stderr)


def _load_public(spec: str) -> Any:
    """For --export-tbs: a public key file (PEM/DER SubjectPublicKeyInfo or certificate) or a key source."""
    from igvm_builder.sign import _ecdsa, key_source_from_spec

    scheme, sep, rest = spec.partition(":")
    path = rest if sep and scheme.lower() == "file" and not rest.startswith("//") else spec
    if (not sep or scheme.lower() == "file") and os.path.exists(path):
        from igvm_builder.errors import SigningError
        from igvm_builder.io import KEY_LIMIT, read_input

        data = read_input(path, "key file", limit=KEY_LIMIT, error=SigningError)
        if b"PRIVATE KEY" not in data and (b"PUBLIC KEY" in data or b"CERTIFICATE" in data):
            return _ecdsa.load_public_key(data, source=path)
    return key_source_from_spec(spec)


def run(args: argparse.Namespace) -> int:
    from igvm_builder.format import IgvmFile
    from igvm_builder.format.blob import as_view
    from igvm_builder.io import STDOUT, atomic_outputs, atomic_write
    from igvm_builder.measure.profiles import DEFAULT_LOADER
    from igvm_builder.sign import ExportedTbs, key_digest
    from igvm_builder.sign.image import export_igvm_tbs, import_igvm_signature_measured
    from igvm_builder.sign.stage import SignOutcome, SnpMeasured, launch_vcpus, plan_signing, sign_file_layout

    _check_usage(args)
    _check_paths(args)
    report = sys.stderr if STDOUT in (args.output, args.export_tbs) else sys.stdout  # keep stdout for the data
    if args.remove:
        from igvm_builder.sign.image import remove_id_block

        out, removed = remove_id_block(IgvmFile.load(args.input))
        atomic_write(args.output, out.iter_chunks())
        if args.json:
            print_json({"output": args.output, "action": "removed" if removed else "unchanged"}, file=report)
        elif not args.quiet:
            print(f"{args.output}: removed the SEV-SNP ID block" if removed else
                  f"{args.output}: {args.input} has no SEV-SNP ID block; written unchanged", file=report)
        return 0
    signing: tuple[IgvmFile, SignPlan] | None = None  # one step: what to sign (as OUT is written)
    if args.import_signature:
        from igvm_builder.errors import SigningError
        from igvm_builder.io import JSON_LIMIT, read_input

        document = read_input(args.import_signature, "to-be-signed document", limit=JSON_LIMIT, error=SigningError)
        tbs = ExportedTbs.from_json(document)
        recorded = _document_loader(document)
        loader, origin = ((args.loader, "--loader") if args.loader else
                          (recorded, f"recorded in {args.import_signature}") if recorded else
                          (DEFAULT_LOADER, "default"))
        vcpus = _document_vcpus(document) if args.vcpus is None and args.vcpu_type is None \
            else (args.vcpus, args.vcpu_type)
        warning = _refuse_test_keys(
            args,
            {
                "ID": key_digest(tbs.id_key),
                "author": key_digest(tbs.author_key) if tbs.author_key is not None else None,
            },
        )
        id_sig = _read_signature(args.id_signature, "ID signature")
        author_sig = (
            _read_signature(args.author_signature, "author signature") if args.author_signature else None
        )
        f = IgvmFile.load(args.input)
        replaced = _has_id_block(f)
        out, signed, measurement = import_igvm_signature_measured(
            f, tbs, id_block_signature=id_sig, id_key_signature=author_sig, loader=loader, vcpus=vcpus[0],
            vcpu_type=vcpus[1]
        )
        outcome = SignOutcome(
            output=args.output, loader=loader, loader_from=origin, launch_digest=bytes(signed.fields.ld),
            policy=signed.fields.policy, family_id=bytes(signed.fields.family_id),
            image_id=bytes(signed.fields.image_id), guest_svn=signed.fields.guest_svn,
            id_key_digest=signed.id_key_digest, author_key_digest=signed.author_key_digest, replaced=replaced,
            test_key_warning=warning,
            measured=SnpMeasured(loader=loader, vcpus=vcpus[0], vcpu_type=vcpus[1], measurement=measurement),
        )
    else:
        config = None
        if args.config:
            from igvm_builder.config import load_config

            config = load_config(args.config)
        plan = plan_signing(config=config, id_key=args.id_key, author_key=args.author_key, loader=args.loader,
                            family_id=args.family_id, image_id=args.image_id, guest_svn=args.guest_svn,
                            vcpus=args.vcpus, vcpu_type=args.vcpu_type)
        f = IgvmFile.load(args.input)
        vcpus = launch_vcpus(f, plan)  # the build's vCPU count (as in its reference values)
        if args.export_tbs:
            id_pub = _load_public(plan.id_key)
            author_pub = _load_public(plan.author_key) if plan.author_key else None
            tbs = export_igvm_tbs(f, id_key=id_pub, author_key=author_pub, loader=plan.loader, vcpus=vcpus[0],
                                  vcpu_type=vcpus[1], family_id=plan.family_id, image_id=plan.image_id,
                                  guest_svn=plan.guest_svn)
            id_digest = key_digest(tbs.id_key)
            author_digest = key_digest(tbs.author_key) if tbs.author_key is not None else None
            warning = _refuse_test_keys(args, {"ID": id_digest, "author": author_digest})
            # The loader is recorded beside the standard fields so that the import measures alike.
            doc = json.loads(tbs.to_json())
            doc["loader"] = plan.loader
            if vcpus != (None, None):
                doc["vcpus"], doc["vcpu_type"] = vcpus
            atomic_write(args.export_tbs, (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("utf-8"))
            if args.json:
                print_json({"output": args.export_tbs, "action": "exported", "loader": plan.loader,
                            "loader_from": plan.loader_from, "launch_digest": tbs.fields.ld.hex(),
                            "policy": f"{tbs.fields.policy:#x}", "family_id": tbs.fields.family_id.hex(),
                            "image_id": tbs.fields.image_id.hex(), "guest_svn": tbs.fields.guest_svn,
                            "id_key_digest": id_digest.hex(),
                            "author_key_digest": author_digest.hex() if author_digest is not None else None,
                            "test_only_key": warning is not None}, file=report)
            elif not args.quiet:
                print(
                    f"{args.export_tbs}: to-be-signed document for {args.input} (loader {plan.loader}, launch "
                    f"digest {tbs.fields.ld.hex()}, policy {tbs.fields.policy:#x})", file=report
                )
                for line in _key_lines(id_digest, author_digest):
                    print(line, file=report)
            _warn(warning)
            return 0
        signing = (f, plan)  # signed below, as its data section is written

    with atomic_outputs(args.output, args.reference_values) as (out_fh, refs_fh):
        assert out_fh is not None
        if signing is not None:
            fh = out_fh

            def put(offset: int, blobs: list[Any]) -> None:  # the data section, as it is laid out
                fh.seek(offset)
                for blob in blobs:
                    fh.write(as_view(blob))
                fh.start_writeback()  # the disk writes it while the file is measured and signed

            out, outcome, layout = sign_file_layout(*signing, output=args.output,
                                                    allow_test_keys=args.allow_test_keys, on_data=put)
            out_fh.seek(0)
            out_fh.write(layout.head)  # the headers, with the signed ID block
        else:
            layout = out.layout()  # kept: the reference values below hash the same bytes
            out_fh.write(layout.head)
            for blob in layout.blobs:
                out_fh.write(as_view(blob))
        if args.reference_values:  # the signed image's reference values, from the build's (--reference)
            from igvm_builder.errors import SigningError
            from igvm_builder.io import sha256_input
            from igvm_builder.reference import ReferenceValues
            from igvm_builder.sign.stage import signed_reference_values

            base = ReferenceValues.load(args.reference) if args.reference else None
            refs = signed_reference_values(out, outcome, base=base, vcpus=vcpus[0], vcpu_type=vcpus[1],
                                           unsigned=sha256_input(args.input, "IGVM file", error=SigningError),
                                           layout=layout)
            assert refs_fh is not None
            refs_fh.write(refs.to_json().encode())
    if args.json:
        print_json(outcome.as_dict(), file=report)
    elif not args.quiet:
        print(outcome.line(), file=report)
    _warn(outcome.test_key_warning)
    return 0


def _document_vcpus(document: bytes) -> tuple[int | None, str | int | None]:
    """The vCPU count and model igvm-builder records in an exported document ((None, None) if absent)."""
    try:
        doc = json.loads(document)
    except ValueError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    count, model = doc.get("vcpus"), doc.get("vcpu_type")
    ok_count = isinstance(count, int) and not isinstance(count, bool) and count >= 1
    return (count if ok_count else None), (model if isinstance(model, str | int) and not isinstance(model, bool)
                                           else None)


def _document_loader(document: bytes) -> str | None:
    """The ``loader`` igvm-builder records in an exported document (None if absent or unknown)."""
    try:
        loader = json.loads(document).get("loader")
    except (ValueError, AttributeError, RecursionError):
        return None
    return loader.lower() if isinstance(loader, str) and loader.lower() in LOADERS else None


def _has_id_block(f: Any) -> bool:
    from igvm_builder.format.defs import PlatformType
    from igvm_builder.sign.image import find_id_blocks

    snp = f.platform(PlatformType.SEV_SNP)
    return bool(snp and find_id_blocks(f, snp.compatibility_mask))
