"""The `skillkv` command: one module per subcommand, all thin over skillkv.api.

Known errors (SkillkvError) print one line on stderr and exit non-zero; nothing stored is touched by a failure.
"""

from __future__ import annotations

import os
import sys

import typer

# OpenMP threads that sleep instead of spinning while they wait (set before any command imports torch; an explicit
# OMP_WAIT_POLICY wins). On a 2-core machine shared with other processes, spinning workers made a cached first
# token 1.2-8.9 s instead of 0.3-0.5 s and decoding 1-2 tok/s instead of 8-13 (docs/BENCHMARKS.md, cold start).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile Agent Skills once into KV-cache snapshots; answer by prefilling only the question.")


def _register() -> None:
    from skillkv.cli import ask, bench, compile, gc, ls  # noqa: F401,A004 - each module adds its command
    from skillkv.cli import eval, export, loadtest, serve, stats, watch  # noqa: F401,A004


def main() -> None:
    from skillkv.errors import SkillkvError

    _register()
    try:
        app()
    except SkillkvError as e:
        print(f"skillkv: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("skillkv: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
        if os.environ.get("SKILLKV_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"skillkv: internal error: {type(e).__name__}: {msg} (SKILLKV_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)


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
