"""Importing a library without the optional extras it would pull in (start-up time).

Some libraries import optional packages at import time for features Azolla never uses:
dependency-injector imports PyYAML for ``Configuration.from_yaml`` and pydantic-settings for
``Configuration.from_pydantic``, structlog imports rich and colorama to render console
tracebacks. Each costs tens of milliseconds on every start of the server, i.e. on every
restart before it serves again. :func:`without` hides such packages for
the duration of one import (the library then takes its "not installed" branch); other code can
still import them afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["without"]


@contextmanager
def without(*names: str) -> Iterator[None]:
    """Make ``import name`` fail with ImportError inside the block, for each of ``names``.

    Packages already imported are left alone (the library sees them as usual).
    """
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # "import name" raises
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
