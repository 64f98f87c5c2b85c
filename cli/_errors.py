"""One-line errors and exit codes shared by every ``auglocal`` command.

Exit codes: 0 success; 2 usage error (click's: unknown option, missing argument, malformed value, unknown model
name); 1 any other error. Any exception a command raises is printed as a single ``Error: ...`` line; the full
traceback is shown only with ``--debug`` (anywhere on the command line) or ``AUGLOCAL_DEBUG=1``.

Commands written in sibling modules get this for free: the handling lives in the group, not in each command.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import click

__all__ = ["AuglocalGroup", "one_line", "is_debug", "DEBUG_FLAG"]

DEBUG_FLAG = "--debug"
_META_KEY = "auglocal_fx.debug"

# Errors whose message is written for the user: shown as is. Anything else is likely a bug: its type is shown too.
_USER_ERRORS = (ValueError, TypeError, OSError, LookupError, NotImplementedError, RuntimeError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages are joined), prefixed by its type for bugs."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])  # KeyError's str() adds quotes
    if isinstance(exc, _USER_ERRORS) and not isinstance(exc, (KeyError, IndexError)) and text:
        return text
    name = type(exc).__name__
    return f"{name}: {text} (run with --debug for the traceback)" if text else f"{name} (run with --debug for the traceback)"


def is_debug(ctx: Optional[click.Context] = None) -> bool:
    if os.environ.get("AUGLOCAL_DEBUG", "").strip() not in ("", "0", "false", "no"):
        return True
    ctx = ctx or click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.meta.get(_META_KEY) or ctx.params.get("debug"):
            return True
        ctx = ctx.parent
    return False


class AuglocalGroup(click.Group):
    """A click group that turns every non-click exception into one ``Error:`` line with exit code 1."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        # --debug is accepted anywhere before "--" (users add it at the end of the failing command line).
        if DEBUG_FLAG in args:
            end = args.index("--") if "--" in args else len(args)
            if DEBUG_FLAG in args[:end]:
                ctx.meta[_META_KEY] = True
                args = [a for i, a in enumerate(args) if not (a == DEBUG_FLAG and i < end)]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if is_debug(ctx):
                raise
            raise click.ClickException(one_line(exc)) from exc
