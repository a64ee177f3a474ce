"""Console entry points: parse flags, call the library."""

from __future__ import annotations

import functools
import shlex
import sys


def command_line(prog: str, argv=None) -> str:
    """The command as typed (shell-quoted), for the records in model files, cards and artifacts."""
    return shlex.join([prog, *(sys.argv[1:] if argv is None else argv)])


def one_line_errors(prog: str):
    """Decorator for a console entry point: bad input (a ModelFileError, ValueError or missing file from
    the library) becomes `prog: error: message` on stderr and exit status 2, argparse's convention,
    instead of a traceback. Anything else (a bug) still shows its traceback."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            from gaq_calc.model.serialization import ModelFileError

            try:
                return main(argv)
            except (ModelFileError, ValueError, FileNotFoundError) as err:
                message = " ".join(str(err).split()) or type(err).__name__
                print(f"{prog}: error: {message}", file=sys.stderr)
                raise SystemExit(2) from None

        return run

    return wrap
