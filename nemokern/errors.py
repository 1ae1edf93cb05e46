"""The mistakes a user can make, one class per kind; each message names what to fix.

- ConfigError: a value nemokern cannot run with, given as a command-line option, a key of a TOML
  config, a field of a model's config.json or a keyword argument.
- DataError: a bad row of a data file, named as file:line (or source row) and field.
- CheckpointError: a checkpoint or model directory nemokern cannot load (a file, a tensor).
- EnvError: a NEMOKERN_* environment variable holding a value nemokern does not take.

All four are ValueErrors: the `nemokern` command answers each with one line and exit status 2.
What happens to a run rather than what a user gave (a non-finite loss, a stop by a signal, a
reward function that raised) is raised by the module it happens in.

A plain ValueError (or TypeError) is a programmer's misuse of an API, as torch raises for its
own arguments: the tensor shape and dtype checks of ops/, model/ and the loss functions, and a
trainer's own internal layout. tests/test_errors.py scans data/, trainers/, tools/ and cli.py
for plain ValueError/RuntimeError raises and lists the few that are such checks.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value a user can fix; the message names the option, key or field.

    `option` is set when the error is about one option, as the message names it (a keyword such
    as "out_dir", or a flag such as "--out"); str() is then "option: message", and `message` the
    text after the name, so that a command line can name the option as its own flag.
    """

    def __init__(self, message: str, *, option: str | None = None):
        super().__init__(f"{option}: {message}" if option else message)
        self.option, self.message = option, message


# What a DataError suggests by default; readers without a skip option pass their own (or None).
SKIP_HINT = "fix the row, or skip bad rows with skip_bad_rows=True / --skip-bad-rows"


class DataError(ValueError):
    """A bad row: `where` is "file:line" or "source row N"; `field` may be None (whole row).

    `message` is the error without the hint; str() adds " (hint)" unless hint is None.
    """

    def __init__(
        self,
        where: str,
        field: str | None,
        reason: str,
        detail: str = "",
        hint: str | None = SKIP_HINT,
    ):
        self.where, self.field, self.reason, self.detail = where, field, reason, detail
        self.hint = hint
        what = f"field {field!r}: " if field else ""
        self.message = f"{where}: {what}{reason}{': ' + detail if detail else ''}"
        super().__init__(self.message + (f" ({hint})" if hint else ""))

    def with_hint(self, hint: str | None) -> DataError:
        """The same error with another hint (None: none), for a reader without skip_bad_rows."""
        return DataError(self.where, self.field, self.reason, self.detail, hint)


class CheckpointError(ValueError):
    """A checkpoint directory nemokern cannot load; the message names the file and tensor."""


class EnvError(ValueError):
    """A NEMOKERN_* variable holds a value nemokern does not take; the message names it."""
