"""The `skillkv` command: one module per subcommand, all thin over skillkv.api.

Known errors (SkillkvError) print one line on stderr and exit non-zero; nothing stored is touched by a failure.
"""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile Agent Skills once into KV-cache snapshots; answer by prefilling only the question.")


def _register() -> None:
    from skillkv.cli import ask, bench, compile, gc, ls  # noqa: F401,A004 - each module adds its command
    from skillkv.cli import loadtest, serve, stats, watch  # noqa: F401


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
