"""Which codec backend to use, decided once at import time.

``FASTNET_NO_EXTENSIONS`` set to any non-empty value (even "0") selects the
pure-Python twin, the convention of aiohttp, yarl, multidict and frozenlist.
Interpreters other than CPython always use the twin.
"""

from __future__ import annotations

import os
import sys

NO_EXTENSIONS: bool = bool(os.environ.get("FASTNET_NO_EXTENSIONS"))
if sys.implementation.name != "cpython":
    NO_EXTENSIONS = True

USE_EXTENSIONS: bool = not NO_EXTENSIONS
