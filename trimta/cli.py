"""The `trimta` command: arguments, exit codes and user-facing errors.

Exit codes: 0 success, 1 runtime failure, 2 invalid usage or configuration.
Each failure prints one line per problem on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trimta import __version__
from trimta.config.load import ConfigError, default_text, load_default, load_file
from trimta.logformat import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"trimta: {message} (see trimta --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of the command line and its subcommands."""
    parser = _Parser(prog="trimta", description="trimta mail transfer agent")
    parser.add_argument("--version", action="version", version=f"trimta {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--config", type=Path, help="TOML configuration file (default: embedded)"
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="lowest level of log lines written to stderr (default: INFO)",
    )

    check = commands.add_parser("check-config", help="check a configuration file")
    check.add_argument("file", nargs="?", type=Path, help="TOML file to check")
    check.add_argument(
        "--defaults",
        action="store_true",
        help="print the embedded default configuration as TOML",
    )
    check.add_argument(
        "--no-files",
        action="store_true",
        help="check only keys and values, not the spool folder, certificates, "
        "CA files and credentials file that they name",
    )
    _add_queue_parser(commands)
    _add_passwd_parser(commands)
    return parser


def _add_passwd_parser(commands) -> None:
    passwd = commands.add_parser(
        "passwd",
        help="add or replace a user in the AUTH credentials file",
        description="The password is read from standard input when it is not "
        "a terminal (first line), else prompted for without echo.",
    )
    passwd.add_argument("user", help="user name for SMTP AUTH, e.g. alice@example.org")
    passwd.add_argument(
        "--file", type=Path, required=True, help="credentials file ([auth] credentials)"
    )
    passwd.add_argument(
        "--domains",
        default="",
        help="comma-separated domains the user may release with ATRN (default: none)",
    )
    passwd.add_argument(
        "--cram-md5",
        action="store_true",
        help="also store the password itself so that CRAM-MD5 works for this user",
    )


def _add_queue_parser(commands) -> None:
    queue = commands.add_parser("queue", help="see and steer queued mail")
    actions = queue.add_subparsers(dest="action", required=True, parser_class=_Parser)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("--config", type=Path, help="TOML configuration file (default: embedded)")
        sub.add_argument("--json", action="store_true", help="print one JSON object")
        return sub

    listing = add("list", "list queued parts: id, domain, arrival, size, sender, state")
    listing.add_argument("domain", nargs="?", help="only this destination domain")
    listing.add_argument("--summary", action="store_true", help="count and bytes per domain")
    show = add("show", "show a message's envelope and headers")
    show.add_argument("id", help="message id, as named in the 250 reply")
    show.add_argument("--body", action="store_true", help="also print the message body")
    flush = add("flush", "ask the running daemon to attempt delivery now")
    flush.add_argument("domain", nargs="?", help="only this destination domain")
    for name, text in (("hold", "keep a message from delivery"), ("release", "undo hold")):
        add(name, text).add_argument("id", help="message id")
    delete = add("delete", "delete a message (the sender gets a DSN)")
    delete.add_argument("id", help="message id")
    delete.add_argument("--silent", action="store_true", help="send no DSN")


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": _run_serve,
        "check-config": _run_check_config,
        "queue": _run_queue,
        "passwd": _run_passwd,
    }
    return handlers[args.command](args)


def _load(path: Path | None):
    return load_default() if path is None else load_file(path)


def _report_config_error(error: ConfigError) -> int:
    for line in error.lines():
        print(f"trimta: {line}", file=sys.stderr)
    return EXIT_USAGE


def _run_check_config(args: argparse.Namespace) -> int:
    if args.defaults:
        sys.stdout.write(default_text())
        return EXIT_OK
    if args.file is None:
        print("trimta: check-config needs a FILE or --defaults", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_file(args.file)
    except ConfigError as error:
        return _report_config_error(error)
    if not args.no_files:
        # Imported here so that the other commands do not pay for trio's
        # import, which the daemon module pulls in.
        from trimta.daemon import check_files

        problems = check_files(config)
        for problem in problems:
            print(f"trimta: {problem}", file=sys.stderr)
        if problems:
            return EXIT_FAILURE
    print(f"config {args.file}: valid")
    return EXIT_OK


def _run_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        config = _load(args.config)
    except ConfigError as error:
        return _report_config_error(error)

    # Imported here so that the other commands do not pay for trio's import.
    from trimta.daemon import StartupError, run

    try:
        graceful = run(config)
    except StartupError as error:
        print(f"trimta: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if not graceful:
        print("trimta: stopped at once by a second signal", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _run_queue(args: argparse.Namespace) -> int:
    from trimta.admin import commands

    try:
        config = _load(args.config)
    except ConfigError as error:
        return _report_config_error(error)
    try:
        if args.action == "list":
            return commands.run_list(config, args.domain, args.summary, args.json)
        if args.action == "show":
            return commands.run_show(config, args.id, args.body, args.json)
        request = {"command": args.action}
        if args.action == "flush":
            request["domain"] = commands.checked_domain(args.domain)
        else:
            request["id"] = args.id
            request["silent"] = getattr(args, "silent", False)
        return commands.run_control(config, request, args.json)
    except ValueError as error:  # a malformed id or domain
        print(f"trimta: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run_passwd(args: argparse.Namespace) -> int:
    from trimta.auth.credentials import CredentialsError, set_user

    try:
        domains = _parse_domains(args.domains)
        password = _read_password()
    except ValueError as error:
        print(f"trimta: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not args.user or any(ord(c) < 32 for c in args.user):
        print(f"trimta: invalid user name {args.user!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        set_user(args.file, args.user, password, domains, cram_md5=args.cram_md5)
    except CredentialsError as error:
        print(f"trimta: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        reason = error.strerror or error
        print(f"trimta: cannot write {args.file}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"trimta: user {args.user} written to {args.file}")
    return EXIT_OK


def _parse_domains(text: str) -> tuple[str, ...]:
    from trimta.smtp.address import AddressError, normalize_domain

    domains = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        try:
            domains.append(normalize_domain(name))
        except AddressError as error:
            raise ValueError(f"--domains: invalid domain {name!r}: {error}") from error
    return tuple(domains)


def _read_password() -> str:
    """Read the password: first line of standard input, or a prompt on a terminal."""
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the passwords do not match")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValueError("the password is empty")
    return password
