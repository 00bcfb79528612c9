"""What a site's failure tells the coordinator: a redacted reason, never the site's paths or subjects.

Flower sends an exception raised in a ClientApp back to the coordinator as the error reply's
reason (``str(type(exc)) + str(exc)``, flwr/supernode/runtime/run_clientapp.py). Error messages
at a site name its folders, manifest rows, image files and subject ids, so the ClientApp's
handlers raise :func:`redacted` instead: the exception's type and a reference, e.g.
``train failed at this site: CohortError (details in the site's log, reference 3f9a0c1e)``. The
full error, with the same reference and its traceback, is logged at the site only.

Our design: an allowlist, not a scrubber. Scrubbing paths and ids out of free text misses what
it does not recognise (a subject id is any string); only errors built from the coordinator's own
input (:class:`PublicError`, e.g. a refused run-config key) pass their message through.
"""

from __future__ import annotations

import logging
import secrets


class PublicError(Exception):
    """An error whose message holds no site data (only what the coordinator sent, keys, hashes):
    the coordinator receives it as it is."""


class SiteFailure(RuntimeError):
    """The error a site's ClientApp raises to Flower: its message is all the coordinator sees.

    Args:
        reason: the redacted reason.
        reference: the reference the site's log line carries ('' for a public error).
    """

    def __init__(self, reason: str, reference: str = "") -> None:
        super().__init__(reason)
        self.reference = reference


def redacted(what: str, exc: BaseException, site_label: str, logger: logging.Logger) -> SiteFailure:
    """Log ``exc`` in full at the site and return what the coordinator may see of it.

    Args:
        what: the handler that failed ("train", "evaluate").
        exc: the error.
        site_label: names the site in the site's own log line.
        logger: the site's logger.
    """
    if isinstance(exc, SiteFailure):
        return exc
    if isinstance(exc, PublicError):
        logger.error("%s: %s refused: %s", site_label, what, exc)
        return SiteFailure(f"{what} refused at this site: {exc}")
    reference = secrets.token_hex(4)
    logger.error("%s: %s failed [reference %s]: %s: %s", site_label, what, reference, type(exc).__name__, exc,
                 exc_info=exc)
    return SiteFailure(f"{what} failed at this site: {type(exc).__name__} (details in the site's log, "
                       f"reference {reference})", reference)


__all__ = ["PublicError", "SiteFailure", "redacted"]
