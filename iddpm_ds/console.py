"""What a run prints, made for terminals and files alike: a progress bar only where a person watches (a
terminal), and log lines drawn above it rather than inside it.

In a batch job stdout and stderr are files: a bar's carriage-return redraws would pile up there (about 100 KB
for a 1,000-step run) and glue the log lines to its fragments, so there the per-interval log lines alone
report progress.
"""

import logging
import sys

from tqdm.auto import tqdm


def progress_bar(disable: bool = False, **kwargs) -> tqdm:
    """tqdm on a terminal; disabled where its stream (stderr) is not one."""
    return tqdm(disable=disable or not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


class ConsoleHandler(logging.StreamHandler):
    """A log handler for stdout that writes each line above a live progress bar (tqdm.write clears the bar,
    prints the line and redraws the bar), so no line lands inside the bar's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)
