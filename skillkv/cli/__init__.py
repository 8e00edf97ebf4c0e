"""The `skillkv` command: one module per subcommand, all thin over skillkv.api.

Errors, in every command:
  - a bad option or argument (usage error), a known error (SkillkvError) or an internal error prints ONE line on
    stderr, `skillkv: error: ...`, and exits non-zero: 2 for usage and known errors (unless the error says
    otherwise), 1 for internal errors (SKILLKV_DEBUG=1 shows their traceback), 130 when interrupted;
  - with `--json`, the same error is ONE JSON object on stdout instead, {"error": {"message", "type",
    "exit_code"}}, and the exit code is the same (stdout then holds only JSON: a result or this error).
Nothing stored is touched by a failure.
"""

from __future__ import annotations

import json
import os
import re
import sys

import typer

from skillkv import __version__

# OpenMP threads that sleep instead of spinning while they wait (set before any command imports torch; an explicit
# OMP_WAIT_POLICY wins). On a 2-core machine shared with other processes, spinning workers made a cached first
# token 1.2-8.9 s instead of 0.3-0.5 s and decoding 1-2 tok/s instead of 8-13 (docs/BENCHMARKS.md, cold start).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile Agent Skills once into KV-cache snapshots; answer by prefilling only the question.")


def _version(value: bool) -> None:
    if value:
        print(f"skillkv {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Compile Agent Skills once into KV-cache snapshots; answer by prefilling only the question."""


def _register() -> None:
    # the order of `skillkv --help`: the first-contact commands first
    from skillkv.cli import compile, ask, ls, stats, gc, watch, serve  # noqa: F401,A004 - each adds its command
    from skillkv.cli import export, eval, bench, loadtest  # noqa: F401,A004


# the help shows what to type, not Python types: DIR, SIZE, N instead of <path>, <str>, <int range>, <bool>
_METAVARS = {"path": "PATH", "str": "TEXT", "int": "N", "float": "NUMBER"}


def _plain_metavars(cmd) -> None:
    """Give every option without a metavar a plain one (none for flags), in the whole command tree."""
    ctx = None
    for c in [cmd, *getattr(cmd, "commands", {}).values()]:
        params = list(c.params)
        try:
            params.append(c.get_help_option(c.make_context(c.name, [], resilient_parsing=True)))
        except Exception:  # noqa: BLE001 - a help option we cannot reach keeps its own label
            pass
        for p in params:
            if p is None:
                continue
            _plain_range(p)
            if p.param_type_name == "argument":  # its name says what it is; no type column
                p.metavar = p.metavar or p.name.upper()
                p.display_type_rich = lambda ctx=None: None
                continue
            if p.metavar is not None:
                continue
            if getattr(p, "is_flag", False):
                p.metavar = ""
                continue
            try:
                label = p.display_type(ctx)
            except Exception:  # noqa: BLE001 - keep typer's own label
                continue
            base = re.sub(r"^<(?:list\[)?([a-z]+).*>$", r"\1", str(label))
            p.metavar = _METAVARS.get(base, base.upper())


def _plain_range(p) -> None:
    """A numeric range in words at the end of the help text ("at least 1", "0 to 1") instead of typer's
    "[0.0<=x<=1.0]" in the narrow type column."""
    lo, hi = getattr(p, "min", None), getattr(p, "max", None)
    if (lo is None and hi is None) or not hasattr(p, "_get_number_range_help_str"):
        return
    num = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    words = f"{num(lo)} to {num(hi)}" if lo is not None and hi is not None else \
        f"at least {num(lo)}" if lo is not None else f"at most {num(hi)}"
    p.help = f"{(p.help or '').rstrip().rstrip('.')} ({words}).".lstrip()
    p._get_number_range_help_str = lambda: None


def _usage_text(e) -> str:
    """A click usage error as one line: the message, and where to read more."""
    msg = " ".join(x.strip() for x in e.format_message().splitlines() if x.strip()) or "bad usage"
    msg = msg[0].lower() + msg[1:]
    where = getattr(getattr(e, "ctx", None), "command_path", None) or "skillkv"
    if msg.startswith("no such command"):
        from skillkv.cli import app as _app  # noqa: PLW0406 - the registered names

        names = [c.name or c.callback.__name__ for c in _app.registered_commands]
        return f"{msg.rstrip('.')} (commands: {', '.join(names)})"
    return f"{msg.rstrip('.')} (see '{where} --help')"


def error_type(e: BaseException) -> str:
    """The JSON error type of an exception: its class name in snake case (skill_error, prompt_too_long...)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower()


def _fail(message: str, code: int, kind: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"error": {"message": message, "type": kind, "exit_code": code}},
                                    ensure_ascii=False) + "\n")
    else:
        print(f"skillkv: error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    from skillkv.errors import SkillkvError

    try:
        from typer._click.exceptions import UsageError  # typer >= 0.29
    except ImportError:  # pragma: no cover - older typer, real click
        from click.exceptions import UsageError

    _register()
    argv = sys.argv[1:]
    as_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    cmd = typer.main.get_command(app)
    _plain_metavars(cmd)
    try:
        rv = cmd.main(argv, prog_name="skillkv", standalone_mode=False)
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # the help was printed
            sys.exit(2)
        _fail(_usage_text(e), 2, "usage_error", as_json)
    except SkillkvError as e:
        _fail(str(e), e.exit_code, error_type(e), as_json)
    except KeyboardInterrupt:
        _fail("interrupted", 130, "interrupted", as_json)
    except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
        if os.environ.get("SKILLKV_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        _fail(f"internal error: {type(e).__name__}: {first} (SKILLKV_DEBUG=1 shows the traceback)", 1,
              "internal_error", as_json)
    if rv == 130:  # typer turns Ctrl-C inside a command into exit code 130
        _fail("interrupted", 130, "interrupted", as_json)
    if isinstance(rv, int) and rv:
        sys.exit(rv)


def run() -> None:
    """The console entry point (`skillkv`, `python -m skillkv`): main(), then exit without the interpreter's
    teardown. Finalising torch and the transformers modules a model needs takes ~1 s after the answer is out
    (docs/BENCHMARKS.md, cold start); every command has already flushed, committed and renamed what it writes
    (snapshots, index, stats) before main() returns, and nothing here relies on atexit. Tests call main()."""
    code = 0
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`skillkv ls | head`): nothing more to say
            pass
    os._exit(code)
