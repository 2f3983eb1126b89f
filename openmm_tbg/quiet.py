"""Scoped silencing of the banners that importing and using openmmtools prints (issue 21, item 6).

Importing ``openmmtools.mcmc`` imports pymbar, whose loggers print a paragraph about the timeseries module and a
"JAX NOT FOUND" box through logging's last-resort handler (stderr) on every import; openmmtools' multistate
classes log "The openmmtools.multistate API is experimental" on every construction and print a citation list
to stdout. None of these is about the user's run. The filters here drop exactly those messages, by their
logger and their text, and only inside the ``with`` block: every other record of those loggers, and every
Python warning, still comes through.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["BANNERS", "quiet_openmmtools"]

#: Logger name -> start of the messages that are dropped (after leading whitespace).
BANNERS: dict[str, tuple[str, ...]] = {
    "pymbar.timeseries": ("Warning on use of the timeseries module",),
    "pymbar.mbar_solvers": ("********* JAX NOT FOUND",),
    "openmmtools.multistate.multistatesampler": ("Warning: The openmmtools.multistate API is experimental",),
    "openmmtools.multistate.multistatereporter": ("Warning: The openmmtools.multistate API is experimental",),
    "openmmtools.multistate.multistateanalyzer": ("Warning: The openmmtools.multistate API is experimental",),
}


class _DropBanner(logging.Filter):
    """Drop records whose message starts with one of ``prefixes``; pass everything else."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(self.prefixes)


@contextlib.contextmanager
def quiet_openmmtools(citations: bool = False) -> Iterator[None]:
    """Silence openmmtools' and pymbar's banners inside the block.

    Parameters
    ----------
    citations : bool
        Keep the citation list that ``openmmtools.multistate`` samplers print on ``create``/``from_storage``
        (default False: silenced while the block runs, restored afterwards).

    Examples
    --------
    >>> with quiet_openmmtools():                                           # doctest: +SKIP
    ...     from openmmtools import mcmc
    """
    added = []
    for name, prefixes in BANNERS.items():
        log_filter = _DropBanner(prefixes)
        logging.getLogger(name).addFilter(log_filter)
        added.append((name, log_filter))
    sampler_class, silence = None, None
    try:
        if not citations:
            with contextlib.suppress(ImportError):
                from openmmtools.multistate.multistatesampler import MultiStateSampler as sampler_class

                silence = sampler_class._global_citation_silence
                sampler_class._global_citation_silence = True
        yield
    finally:
        if sampler_class is not None:
            sampler_class._global_citation_silence = silence
        for name, log_filter in added:
            logging.getLogger(name).removeFilter(log_filter)
