"""The one check of a site name, wherever a name enters: config keys, site kits, node configs,
sites' replies, the coordinator's registry.

Site names become folder names (TensorBoard sub-runs, certificate folders), node-config values
and log labels, so they are kept plain: letters, digits, ``_`` and ``-``, starting with a letter
or digit, 1-63 characters. A name like ``x/../y`` or ``abc\\n`` is refused where it enters rather
than escaped where it is used.
"""

from __future__ import annotations

import re

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def check_site_name(name: str, where: str = "site name") -> str:
    """``name`` if it is a usable site name (module docstring), else :class:`ValueError`.

    Args:
        name: the candidate.
        where: what to call it in the error (e.g. the file and key it came from).
    """
    # fullmatch: ``$`` alone would accept a trailing newline ("abc\n").
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        raise ValueError(f"{where}: {name!r} is not a valid site name (letters, digits, '_' and '-', "
                         "starting with a letter or digit, at most 63 characters)")
    return name


__all__ = ["SITE_NAME", "check_site_name"]
