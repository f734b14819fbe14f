# The compiled connection core has the twin's interface: types for C
# accelerators are the same (frozenlist's __init__.pyi does this too).
from ._core_py import ConnectionCore as ConnectionCore
from ._wakeup import _Wakeup as Wakeup

__all__ = ["ConnectionCore", "Wakeup"]
