"""``igvm-builder verify FILE``: verify the SEV-SNP ID block of an IGVM file.

Exit 0 with a one-line summary when everything verifies; exit 1 with one line per
failed check otherwise (what is checked: ``docs/SIGNING.md``).
"""

from __future__ import annotations

import argparse
import sys

from igvm_builder.commands._common import add_loader_option, print_json
from igvm_builder.commands._vcpus import add_vcpu_options


def _digest(value: str) -> bytes:
    from igvm_builder.hexstr import parse_hex

    try:
        raw = parse_hex(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected 96 hexadecimal digits (a SHA-384 key digest)") from None
    if len(raw) != 48:
        raise argparse.ArgumentTypeError(f"expected 48 bytes (96 hex digits), got {len(raw)} bytes")
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="signed IGVM file")
    add_loader_option(parser, "loader profile whose launch digest the ID block must sign "
                              "(default: the reference values' loader, else hyperv)")
    parser.add_argument(
        "--id-key-digest", type=_digest, metavar="HEX", help="expected ID key digest (SHA-384)"
    )
    parser.add_argument(
        "--author-key-digest", type=_digest, metavar="HEX", help="expected author key digest (SHA-384)"
    )
    parser.add_argument(
        "--reference",
        metavar="REF.json",
        help="reference values (build/measure --reference-values): SNP digest, policy, key digests",
    )
    add_vcpu_options(parser, "the reference values' (kvm_vmsas), else the file's VP contexts")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="when a check fails, look for why: the policy the ID key signed (~70 ECDSA verifications) "
        "and the loader whose digest the ID block signs (the file measured under every loader)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON (schema: docs/JSON.md)")


def run(args: argparse.Namespace) -> int:
    from igvm_builder.format import IgvmFile
    from igvm_builder.sign.image import IdBlockVerificationError, verify_igvm

    reference = None
    if args.reference:
        from igvm_builder.reference import ReferenceValues

        reference = ReferenceValues.load(args.reference)  # the typed value; an unusable one is exit 2
    f = IgvmFile.load(args.file)
    try:
        report = verify_igvm(
            f,
            loader=args.loader,
            id_key_digest=args.id_key_digest,
            author_key_digest=args.author_key_digest,
            reference=reference,
            vcpus=args.vcpus,
            vcpu_type=args.vcpu_type,
            explain=args.explain,
        )
    except IdBlockVerificationError as exc:
        if args.json:
            print_json({"file": args.file, "ok": False, "loader": args.loader,
                        "failures": [{"kind": x.kind, "message": x.message} for x in exc.failures]})
        for failure in exc.failures:
            print(f"igvm-builder verify: error: {args.file}: {failure.message}", file=sys.stderr)
        return 1
    if args.json:
        print_json({
            "file": args.file,
            "ok": True,
            "loader": report.loader,
            "launch_digest": report.launch_digest.hex(),
            "policy": f"{report.policy:#x}",
            "family_id": report.family_id.hex(),
            "image_id": report.image_id.hex(),
            "guest_svn": report.guest_svn,
            "id_key_digest": report.id_key_digest.hex(),
            "author_key_digest": report.author_key_digest.hex() if report.author_key_digest is not None else None,
            "reference_checked": report.reference_checked,
            "test_only_key": report.uses_test_only_key,
            "uncovered_pages": report.uncovered_pages,
            "failures": [],
        })
    else:
        print(f"{args.file}: OK: {report.summary()}")
    # what a valid ID block proves, and what it does not (docs/SIGNING.md, "What verify proves")
    covered = "the SEV-SNP launch only: the pages, VMSAs and directives an SEV-SNP launch measures"
    if report.uncovered_pages:
        print(f"igvm-builder verify: note: {args.file}: the ID block covers {covered}; not covered: "
              f"{report.uncovered_detail}", file=sys.stderr)
    else:
        print(f"igvm-builder verify: note: {args.file}: the ID block covers {covered}; every page of this "
              "file is among them", file=sys.stderr)
    if report.uses_test_only_key:
        print(
            f"igvm-builder verify: warning: {args.file}: signed with a public TEST-ONLY key: it proves nothing",
            file=sys.stderr,
        )
    return 0
