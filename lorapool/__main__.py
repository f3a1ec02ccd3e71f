"""``python -m lorapool`` / the ``lorapool`` console script."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _add_validate(commands: Any) -> None:
    validate = commands.add_parser(
        "validate",
        help="check an adapter before registering it (prints every problem found)",
        description=(
            "Validate a PEFT LoRA adapter directory or .tar/.tar.gz/.zip archive. "
            "Exit status: 0 accepted, 1 refused, 2 usage error."
        ),
    )
    validate.add_argument("path", help="adapter directory or archive")
    validate.add_argument(
        "--base", metavar="MODEL_DIR", help="local base model directory (enables base checks)"
    )
    validate.add_argument("--max-rank", type=int, metavar="N", help="the backend's max rank")
    validate.add_argument(
        "--force", action="store_true", help="accept norm anomalies and base-name mismatches"
    )


def _add_stamp(commands: Any) -> None:
    stamp = commands.add_parser(
        "stamp",
        help="declare an adapter's base model (fingerprint and tokenizer hash)",
        description=(
            "Write lorapool.json into an adapter directory with the base model's fingerprint "
            "and tokenizer hash; registration then refuses the adapter on any other base."
        ),
    )
    stamp.add_argument("path", help="adapter directory")
    stamp.add_argument("--base", metavar="MODEL_DIR", required=True, help="local base model")


def _stamp(args: argparse.Namespace) -> int:
    from .errors import AdapterValidationError
    from .formats import BaseModelSpec, stamp_adapter

    try:
        target = stamp_adapter(args.path, BaseModelSpec.from_dir(args.base))
    except (OSError, ValueError, AdapterValidationError) as exc:
        print(f"lorapool stamp: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {target}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import SourceNotFound
    from .formats import BaseModelSpec
    from .types import Capabilities
    from .validation import validate_adapter

    base = None
    if args.base is not None:
        try:
            base = BaseModelSpec.from_dir(args.base)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(
                f"lorapool validate: error: cannot read base model {args.base}: {exc}",
                file=sys.stderr,
            )
            return 2
    caps = None
    if args.max_rank is not None:
        if args.max_rank < 1:
            print("lorapool validate: error: --max-rank must be >= 1", file=sys.stderr)
            return 2
        caps = Capabilities(
            max_slots=1,
            max_rank=args.max_rank,
            max_batch=1,
            base_model=base.name if base else "",
            target_modules=frozenset(base.module_shapes) if base else frozenset(),
            dora=True,  # as TorchBackend, the embedded default, serves it
        )
    try:
        report = validate_adapter(Path(args.path), base=base, caps=caps, force=args.force)
    except SourceNotFound as exc:
        print(f"lorapool validate: error: {exc}", file=sys.stderr)
        return 2
    verdict = "ACCEPTED" if report.ok else "REFUSED"
    print(
        f"{verdict} {args.path}: {len(report.refusals)} refusal(s), "
        f"{len(report.problems)} problem(s)"
    )
    if report.config is not None:
        cfg = report.config
        print(
            f"  rank {cfg.r}, alpha {cfg.lora_alpha:g}, targets {', '.join(cfg.target_modules)}, "
            f"{len(report.tensors)} tensors"
        )
    for problem in report.problems:
        forced = " (accepted with --force)" if report.forced and problem.forceable else ""
        print(f"  [{problem.reason}] {problem.detail}{forced}")
    if base is None:
        print(
            "  note: no --base given; base-model checks (modules, layers, shapes, "
            "fingerprint, tokenizer) skipped"
        )
    for note in report.notes:
        if not note.startswith(("no base model given", "accepted with --force")):
            print(f"  note: {note}")
    return 0 if report.ok else 1


def _add_signing(commands: Any) -> None:
    keygen = commands.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing adapters",
        description=(
            "Write ID.key (private, PEM, mode 0600) and ID.pub (public, PEM) into DIR. The "
            "key id defaults to the key's fingerprint (ed25519:<16 hex>); sign with the same "
            "--key-id when you choose one."
        ),
    )
    keygen.add_argument("--out", metavar="DIR", required=True, help="directory for the key files")
    keygen.add_argument("--key-id", metavar="ID", help="the key's id (default: its fingerprint)")
    sign = commands.add_parser(
        "sign",
        help="sign an adapter directory (writes lorapool-signature.json)",
        description=(
            "Sign the files of an adapter directory (config, weights, and lorapool.json when "
            "stamped) with an Ed25519 private key. Exit status: 0 signed, 2 error."
        ),
    )
    sign.add_argument("path", help="adapter directory")
    sign.add_argument("--key", metavar="KEYFILE", required=True, help="private key (PEM)")
    sign.add_argument("--key-id", metavar="ID", help="the key's id (default: its fingerprint)")
    verify = commands.add_parser(
        "verify",
        help="verify an adapter directory's signature",
        description=(
            "Verify an adapter directory's lorapool-signature.json and every signed file. "
            "Exit status: 0 verified, 1 refused (the reason is printed), 2 usage error."
        ),
    )
    verify.add_argument("path", help="adapter directory")
    verify.add_argument(
        "--keyring",
        metavar="FILE_OR_PUBKEY",
        required=True,
        help="a keyring file (JSON) or one public key file (PEM)",
    )
    verify.add_argument("--key-id", metavar="ID", help="the id of a single public key")
    verify.add_argument(
        "--tenant", default="", help="verify as this tenant's adapter (its keys count too)"
    )


def _keygen(args: argparse.Namespace) -> int:
    from .signing import write_key_pair

    try:
        private, public, key_id = write_key_pair(args.out, key_id=args.key_id)
    except (OSError, ValueError) as exc:
        print(f"lorapool keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"key id {key_id}\nwrote {private} (keep it secret)\nwrote {public}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .signing import load_private_key, sign_directory

    if not Path(args.path).is_dir():
        print(f"lorapool sign: error: {args.path} is not a directory", file=sys.stderr)
        return 2
    try:
        signed = sign_directory(args.path, load_private_key(args.key), key_id=args.key_id)
    except (OSError, ValueError) as exc:
        print(f"lorapool sign: error: {exc}", file=sys.stderr)
        return 2
    print(f"signed {args.path} with key {signed.key_id} ({len(signed.files)} files)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import SignatureError
    from .signing import Keyring, verify_directory

    if not Path(args.path).is_dir():
        print(f"lorapool verify: error: {args.path} is not a directory", file=sys.stderr)
        return 2
    try:
        keyring = Keyring.load(args.keyring, key_id=args.key_id)
    except (OSError, ValueError) as exc:
        print(f"lorapool verify: error: keyring {args.keyring}: {exc}", file=sys.stderr)
        return 2
    try:
        signed = verify_directory(args.path, keyring, tenant=args.tenant, adapter=args.path)
    except SignatureError as exc:
        print(f"REFUSED {args.path}: {exc.reason}: {exc.detail}")
        return 1
    assert signed is not None  # the policy is required: unsigned raised "missing"
    print(f"VERIFIED {args.path}: signed by {signed.key_id}, {len(signed.files)} files")
    return 0


# What the ``server`` extra brings: an ImportError naming one of these means it is missing.
_SERVER_EXTRA = ("starlette", "uvicorn", "prometheus_client", "sse_starlette")


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI-compatible HTTP API as a config file describes",
        description=(
            "Serve a pool with the OpenAI API as the TOML file CONFIG describes; every "
            "setting may be overridden by a LORAPOOL_ environment variable "
            "(LORAPOOL_SERVER__PORT=9000). Start from the shipped example: "
            "lorapool serve --print-example-config > server.toml. "
            "SIGTERM drains: new requests get 503, streams in flight finish."
        ),
    )
    serve.add_argument("config", nargs="?", help="TOML config file")
    serve.add_argument(
        "--print-example-config",
        action="store_true",
        help="print the example config (every section, commented) and exit",
    )
    serve.add_argument(
        "--check", action="store_true", help="validate the config (and read its secrets), then exit"
    )


def example_config() -> str:
    """The example server config shipped in the package (``lorapool/server/example.toml``)."""
    from importlib.resources import files

    # Read through the ``lorapool`` package: ``lorapool.server`` needs the server extra.
    return files("lorapool").joinpath("server", "example.toml").read_text(encoding="utf-8")


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.print_example_config:
        sys.stdout.write(example_config())
        return 0
    if args.config is None:
        parser.error("serve: a CONFIG file is required (or --print-example-config)")
    try:
        from .server.config import load_config
        from .server.run import serve
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in _SERVER_EXTRA or getattr(exc, "extra", None) == "server":
            print(
                "lorapool serve: error: the server extra is not installed: "
                f'pip install "lorapool[server]" ({exc})',
                file=sys.stderr,
            )
            return 2
        raise
    try:
        config = load_config(args.config)
        if args.check:
            config.build_scheduler()
            config.build_auth()
    except (OSError, ValueError) as exc:
        print(f"lorapool serve: error: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok ({len(config.adapters)} adapter(s) to register at start)")
        return 0
    serve(config)
    return 0


def _add_audit(commands: Any) -> None:
    audit = commands.add_parser(
        "audit",
        help="read or verify the audit log of a registry file",
        description=(
            "The audit log kept in a registry's SQLite file (registrations, promotions, "
            "rollbacks, deletions, refused signatures and accesses)."
        ),
    )
    actions = audit.add_subparsers(dest="audit_command", required=True)
    listing = actions.add_parser(
        "list",
        help="print the entries, oldest first",
        description="Print the audit entries, oldest first. Exit status: 0, or 2 on error.",
    )
    check = actions.add_parser(
        "verify",
        help="check the hash chain",
        description=(
            "Check every entry's hash and its link to the entry before. Exit status: 0 the "
            "chain holds (prints the count and the last hash), 1 an entry fails (named), "
            "2 error."
        ),
    )
    for sub in (listing, check):
        sub.add_argument("--registry", metavar="PATH", required=True, help="registry SQLite file")
    listing.add_argument("--tenant", help="only entries about this tenant")
    listing.add_argument("--adapter", help="only entries about this adapter id")
    listing.add_argument("--action", help="only this action (register, rollback, ...)")
    listing.add_argument("--after", type=int, default=0, metavar="SEQ", help="only after SEQ")
    listing.add_argument("--limit", type=int, metavar="N", help="at most N entries")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")


def _audit(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from .errors import AuditChainBroken, LorapoolError
    from .registry.audit import AuditLog
    from .registry.stores import SqliteRegistryStore

    where = f"lorapool audit {args.audit_command}"
    if not Path(args.registry).is_file():
        print(f"{where}: error: no registry file at {args.registry}", file=sys.stderr)
        return 2
    try:
        store = SqliteRegistryStore(args.registry)
    except LorapoolError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2
    try:
        log = AuditLog(store)
        if args.audit_command == "verify":
            try:
                count = log.verify()
            except AuditChainBroken as exc:
                print(f"BROKEN at entry {exc.seq}: {exc.detail}")
                return 1
            seq, digest = log.head()
            print(f"OK {count} entries; last entry {seq}, hash {digest}")
            return 0
        entries = log.entries(
            tenant=args.tenant,
            adapter=args.adapter,
            action=args.action,
            after=args.after,
            limit=args.limit,
        )
        for e in entries:
            if args.json:
                print(json.dumps(e.as_dict(), sort_keys=True))
                continue
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.at))
            detail = json.dumps(dict(e.detail), sort_keys=True)
            print(
                f"{e.seq:>6} {when} {e.action:<18} tenant={e.tenant or '-'} "
                f"adapter={e.adapter or '-'} actor={e.actor or '-'} {detail}"
            )
        return 0
    except (LorapoolError, ValueError) as exc:  # ValueError: a row edited into bad JSON
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _add_promote(commands: Any) -> None:
    promote = commands.add_parser(
        "promote",
        help="promote an adapter version through an eval gate (or to a canary)",
        description=(
            "Open the pool a server config describes (its registry and store), run the gate's "
            "cases through the candidate version and the version its alias serves now, and "
            "move the alias when no scorer regresses past the threshold (with --canary, only "
            "that share of its traffic). Prints the gate's report. Exit status: 0 promoted, "
            "1 refused by the gate, 2 error."
        ),
    )
    promote.add_argument("config", help="the server's TOML config file (lorapool serve's)")
    promote.add_argument("name", help="the alias (the tenant's adapter name)")
    promote.add_argument("version", help="the version to promote (registered already)")
    promote.add_argument("--tenant", required=True, help="the alias's owner")
    promote.add_argument(
        "--cases", metavar="FILE", help="gate cases: JSON Lines, or a JSON list (or {cases})"
    )
    promote.add_argument("--gate-name", default="gate", help="the gate's name (its identity)")
    promote.add_argument(
        "--threshold", type=float, default=None, help="largest regression allowed (0.005)"
    )
    promote.add_argument(
        "--scorer",
        action="append",
        metavar="NAME",
        help="a built-in scorer (exact_match, tool_call_names, tool_call_arguments); repeat",
    )
    promote.add_argument(
        "--canary", type=float, metavar="PERCENT", help="send only this share to the version"
    )
    promote.add_argument("--actor", help="who promotes, for the audit log")
    promote.add_argument("--json", action="store_true", help="print the report as JSON")


def _promote(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from tqdm.auto import tqdm

    from .errors import LorapoolError, PromotionRefused
    from .lifecycle import DEFAULT_THRESHOLD, Gate, GateReport, load_cases

    where = "lorapool promote"
    try:
        from .server.config import load_config
    except ImportError as exc:
        print(
            f'{where}: error: needs the server extra: pip install "lorapool[server]" ({exc})',
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(args.config)
        gate = None
        if args.cases is not None:
            gate = Gate(
                load_cases(args.cases),
                name=args.gate_name,
                threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
                scorers=args.scorer,
            )
    except (OSError, ValueError, LorapoolError) as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2

    def show(report: GateReport | None) -> None:
        if report is not None:
            print(json.dumps(report.to_dict()) if args.json else report.format())

    async def run() -> int:
        async with config.build_pool() as pool:
            with tqdm(
                total=0 if gate is None else len(gate.cases),
                desc=f"gate {args.name}@{args.version}",
                unit="case",
                file=sys.stderr,
                disable=gate is None,
            ) as bar:

                def progress(done: int, total: int) -> None:
                    bar.update(done - bar.n)

                try:
                    done = await pool.promote(
                        args.name,
                        args.version,
                        tenant=args.tenant,
                        gate=gate,
                        canary=args.canary,
                        on_progress=progress,
                        actor=args.actor,
                    )
                except PromotionRefused as exc:
                    bar.close()
                    show(exc.report)
                    print(f"REFUSED {exc.adapter}: {exc.reason}")
                    return 1
            show(done.report)
            split = ", ".join(f"{v} {w:g}%" for v, w in done.traffic.items())
            print(f"PROMOTED {done.adapter} (baseline {done.baseline or '-'}; traffic {split})")
            return 0

    try:
        return asyncio.run(run())
    except (OSError, ValueError, LorapoolError) as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``lorapool bench|validate|stamp|keygen|sign|verify|serve ...``."""
    parser = argparse.ArgumentParser(prog="lorapool", description="lorapool command line")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark (side-by-side ratios)")
    from . import bench as benchmarks

    benchmarks.add_scenarios(bench)
    _add_validate(commands)
    _add_stamp(commands)
    _add_audit(commands)
    _add_signing(commands)
    _add_serve(commands)
    _add_promote(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)  # logs JSON lines of its own
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return benchmarks.run(args)
    if args.command == "validate":
        return _validate(args)
    if args.command == "stamp":
        return _stamp(args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "promote":
        return _promote(args)
    if args.command in ("keygen", "sign", "verify"):
        return {"keygen": _keygen, "sign": _sign, "verify": _verify}[args.command](args)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
