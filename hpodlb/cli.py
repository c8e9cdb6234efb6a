"""The `hpodlb` command: dispatch, the commands' exit statuses, and wiring adapters to the core.

The parser, the exit statuses' meaning and how a failure is said are `commandline.py`'s; the
commands that create and delete AWS resources are `cliaws.py`'s. boto3 and paramiko are imported
only by the commands that need them, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from hpodlb.config import Config
    from hpodlb.drain import Drains

from hpodlb.cliaws import cmd_provision, cmd_teardown
from hpodlb.commandline import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_READER_GONE,
    EXIT_UNUSABLE,
    Command,
    build_parser,
)
from hpodlb.commandline import fail as _fail


def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    from hpodlb import report
    from hpodlb.state import load_state

    state, warning = load_state(config.state.dir)
    if warning:
        _log().warning("state_rebuilt", warning=warning)
    from hpodlb.wiring import build_reconciler

    outcome = build_reconciler(config).run_pass(state, apply=False)
    if outcome.inventory_error:
        _fail(f"cannot plan: {outcome.inventory_error}")
        return EXIT_UNUSABLE
    if outcome.errors:
        for error in outcome.errors:
            _fail(f"cannot plan: {error}")
        return EXIT_UNUSABLE
    assert outcome.plan is not None
    render = report.plan_json if args.json else report.plan_text
    print(render(outcome.plan, outcome.nodes))
    return EXIT_OK if outcome.plan.settled else EXIT_PENDING


def cmd_once(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.lock import InstanceLock, LockedError
    from hpodlb.outcome import log_finished
    from hpodlb.record import save_outcome
    from hpodlb.state import load_state

    try:
        lock = InstanceLock(config.state.dir).acquire()
    except LockedError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    with lock:
        state, warning = load_state(config.state.dir)
        if warning:
            _log().warning("state_rebuilt", warning=warning)
        from hpodlb.wiring import build_reconciler

        reconciler = build_reconciler(config)
        outcome = reconciler.run_pass(state, apply=True)
        save_outcome(config.state.dir, state, outcome)
        if config.metrics.textfile is not None:  # under the lock: a daemon may own the file
            from hpodlb.metrics import write_once

            write_once(config, state, outcome, reconciler)
    log_finished(outcome)
    if outcome.inventory_error:
        _fail(outcome.inventory_error)
        return EXIT_UNUSABLE
    if outcome.standby:  # another head acts: observing was this pass's whole job
        print(f"{outcome.standby}: observed only, changed nothing; {outcome.summary()}")
        sound = outcome.leadership is not None and outcome.leadership.sound
        return EXIT_OK if sound and not outcome.errors else EXIT_PENDING
    print(outcome.summary())
    return EXIT_OK if outcome.converged else EXIT_PENDING


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.lock import InstanceLock, LockedError
    from hpodlb.logs import setup_logging
    from hpodlb.service import Daemon
    from hpodlb.wiring import build_reconciler

    setup_logging(verbose=getattr(args, "verbose", False), stream=sys.stdout)
    try:
        lock = InstanceLock(config.state.dir).acquire()
    except LockedError as exc:
        _fail(str(exc))
        _log().error("daemon_refused", error=str(exc))
        return EXIT_PENDING
    with lock:
        from hpodlb.config import config_path

        path = config_path(getattr(args, "config", None))
        return Daemon(path, config, build_reconciler, lock=lock).serve()


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    import json

    from hpodlb import report
    from hpodlb.state import load_state

    state, warning = load_state(config.state.dir)
    arns = [tg.arn for tg in config.target_groups]
    if args.live:
        from hpodlb.context import read_boot_id
        from hpodlb.record import record_live_health
        from hpodlb.wiring import Adapters

        # Into the state as read: the state file is not written.
        groups = Adapters(config).groups
        record_live_health(groups, state, read_boot_id(), time.monotonic(), time.time())
    if args.json:
        doc = report.status_doc(state, arns, time.time())
        doc["state_warning"] = warning
        print(json.dumps(doc, indent=2))
    else:
        if warning:
            print(warning)
        print(report.status_text(state, arns, time.time()))
    return EXIT_OK


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.checks import run_checks
    from hpodlb.wiring import Adapters

    problems = 0
    for ok, line in run_checks(config, Adapters(config)):
        print(f"{'ok  ' if ok else 'FAIL'}  {line}")
        problems += not ok
    print(f"{problems} problem(s) found" if problems else "configuration is usable")
    return EXIT_PENDING if problems else EXIT_OK


def cmd_doctor(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.doctor import render_json, render_text, run_doctor
    from hpodlb.wiring import Adapters

    report = run_doctor(config, Adapters(config))
    print(render_json(report) if args.json else render_text(report))
    return report.exit_status


def cmd_drain(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.drain import DrainError, Drains, drain_lines

    drains = Drains(config)
    try:
        result = drains.drain(args.ip, args.reason, force=args.force)
    except DrainError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    if result.restored:
        print(f"intents.json was gone: restored the drains of {', '.join(result.restored)}")
    for line in drain_lines(result, config):
        print(line)
    if args.wait is None:
        return EXIT_OK
    return _wait_drained(drains, result.node.ip, result.request.requested_at, args.wait)


def _wait_drained(drains: Drains, ip: str, since: float, seconds: float) -> int:
    from hpodlb.sessions import NO_LOGINS

    def say(line: str) -> None:  # each change as it happens, also into a pipe (`| tee`) or a file
        print(line, flush=True)

    try:
        done = drains.wait(ip, since, seconds, say, time.monotonic)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {ip} stays drained (`hpodlb undrain {ip}` to undo)")
        return EXIT_INTERRUPTED
    if not done:
        print(f"{ip}: not yet both out of rotation and empty after {seconds:g}s")
        return EXIT_PENDING
    if drains.counts_sessions:
        print(f"{ip}: out of rotation, and no SSH session left")
    else:
        print(f"{ip}: out of rotation (its sessions are not counted: {NO_LOGINS})")
    return EXIT_OK


def cmd_undrain(config: Config, args: argparse.Namespace) -> int:
    from hpodlb.drain import DrainError, Drains

    try:
        was, restored = Drains(config).undrain(args.ip)
    except DrainError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    if restored:
        print(f"intents.json was gone: restored the drains of {', '.join(restored)}")
    if was:
        print(
            f"{args.ip} undrained: back in rotation at the daemon's next pass, once its host keys "
            "verify."
        )
    else:
        print(f"{args.ip} is not drained: nothing to do")
    return EXIT_OK


def cmd_keys(config: Config, args: argparse.Namespace) -> int:
    from hpodlb import keyadmin

    action = args.keys_command
    try:
        if action == "generate":
            keyadmin.generate_keys(config, force=args.force)
        elif action == "adopt":
            keyadmin.adopt_keys(config, args.from_ip, force=args.force)
        elif action == "rotate":
            keyadmin.rotate_keys(config, args.from_ip)
        elif action == "trust":
            request = keyadmin.trust_node(config, args.ip)
            print(f"{args.ip} ({request.instance_id}): its current keys are accepted once; the")
            print("next pass pushes the canonical keys to it and puts it back in rotation.")
            return EXIT_OK
        elif action == "known-hosts":
            print("\n".join(keyadmin.known_hosts(config, args.host, args.port)))
            return EXIT_OK
        elif action == "ssh-config":
            block = keyadmin.ssh_config(config, args.host, args.port, args.dns_name)
            print(block.text)
            if block.missing:
                _fail(block.missing)
                return EXIT_PENDING
            return EXIT_OK
        listing = keyadmin.show(config)
    except keyadmin.KeyCommandError as exc:
        _fail(str(exc))
        return EXIT_PENDING
    store = keyadmin.store_of(config)
    for label, keys in (("", listing.current), ("previous ", listing.previous)):
        where = store.set_dir("previous" if label else "current")
        for key_type, key in keys.items():
            print(f"{label}{key_type:8} {key.fingerprint}  {where}/ssh_host_{key_type}_key")
    if action == "rotate":
        print("Rotation started: the previous keys stay valid until every login node presents the")
        print("new ones. Hand users the new lines now: hpodlb keys known-hosts --host NLB-NAME")
    return EXIT_OK


def cmd_example(config: Config | None, args: argparse.Namespace) -> int:
    """Print one shipped file exactly as shipped. Reads no config: it is how the config starts."""
    from importlib.resources import files

    from hpodlb.commandline import EXAMPLES

    sys.stdout.write((files("hpodlb") / "examples" / EXAMPLES[args.name]).read_text())
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "run": cmd_run,
    "once": cmd_once,
    "plan": cmd_plan,
    "status": cmd_status,
    "check-config": cmd_check_config,
    "doctor": cmd_doctor,
    "drain": cmd_drain,
    "undrain": cmd_undrain,
    "provision": cmd_provision,
    "teardown": cmd_teardown,
    "keys": cmd_keys,
    "example": cmd_example,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the config, run the command: the one boundary every command's failure crosses.

    An exception no command handles is a bug or an environment hpodlb cannot use (e.g.
    AWS_DEFAULTS_MODE=bogus): it exits 2, "could not even evaluate", never 1, which `plan` and `once`
    use for "changes pending". One line names it; -v adds the traceback. Output into a pipe whose
    reader has gone (`hpodlb plan --json | head -1`) ends quietly, as a SIGPIPE would end it.
    """
    verbose = False
    try:
        try:
            args = build_parser(COMMANDS).parse_args(argv)  # --help and usage errors exit here
            verbose = bool(getattr(args, "verbose", False))
            from hpodlb.logs import setup_logging

            setup_logging(verbose=verbose, stream=sys.stderr)
            return _load_config_and_run(args)
        finally:
            # Output still buffered for a reader that went away fails here, not at interpreter exit.
            sys.stdout.flush()
    except BrokenPipeError as exc:
        if not _reader_gone(sys.stdout) and not _reader_gone(sys.stderr):
            return _unexpected(exc, verbose=verbose)  # a socket's EPIPE is no closed pipe of ours
        return _quiet_after_reader_gone()
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # the boundary: anything left becomes one line and exit 2
        return _unexpected(exc, verbose=verbose)


def _load_config_and_run(args: argparse.Namespace) -> int:
    func: Command = args.func
    if func is cmd_example:  # what ships in the package, for an admin who has no config yet
        return cmd_example(None, args)
    from hpodlb.config import ConfigError, config_path, load_config

    path = config_path(getattr(args, "config", None))
    try:
        return func(load_config(path, os.environ), args)
    except ConfigError as exc:  # the file, an override, or a setting read later (AWS_MAX_ATTEMPTS)
        # One line per problem and nothing else: a log event beside it said the same thing twice.
        for line in str(exc).splitlines():
            _fail(f"config error: {line}")
        return EXIT_UNUSABLE


def _reader_gone(stream: TextIO) -> bool:
    """True when `stream` is a pipe whose reading end is closed (`hpodlb plan | head -1`)."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor (pytest's capture), or already closed
        return False


def _quiet_after_reader_gone() -> int:
    """Stop writing, say nothing, exit as a process killed by SIGPIPE would.

    Whoever closed the pipe has all it wanted (`head -1`); a traceback would only be noise. Output
    still buffered would fail again when the interpreter flushes it at exit (and turn the status
    into 120), so the stream that broke now points at /dev/null. 141 rather than 0 or 1 because the command did
    not finish saying what it had to say: `plan`'s 0 or 1 would claim a verdict nobody read. 141
    is what a shell reports for any Unix tool whose reader went away (`yes | head -1`), so
    `set -o pipefail` scripts already know it.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        if _reader_gone(stream):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


def _unexpected(exc: BaseException, *, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    first = next(iter(str(exc).splitlines()), "")
    hint = "" if verbose else " (run with -v for the traceback)"
    _fail(f"unexpected error: {type(exc).__name__}: {first}{hint}")
    return EXIT_UNUSABLE


def _log() -> Any:
    from hpodlb.logs import get_logger

    return get_logger("hpodlb.cli")
