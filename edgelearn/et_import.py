"""Import the ExecuTorch runtime without the exporter (`executorch.exir`): ~120 MB less RSS on a device.

`executorch.extension.pybindings.portable_lib` needs only `executorch.exir._warnings`, but importing it
runs `executorch/exir/__init__.py`, which pulls in the whole exporter (torch._dynamo, sympy, torchao).
While the runtime modules load, `executorch.exir` is a bare package (its real path, no `__init__`
executed); afterwards it is removed again, so a later `import executorch.exir` (an exporter in the same
process) gets the real package. If anything about this fails (a new ExecuTorch layout), the plain
import is used and a warning logged; tests/test_runtime_memory.py fails on such a version change.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from functools import cache

log = logging.getLogger(__name__)
EXIR = "executorch.exir"


@cache
def runtime_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(executorch.runtime, executorch.extension.training), imported without the exporter if possible."""
    if EXIR in sys.modules:  # the exporter is already loaded: nothing to save
        return _plain()
    try:
        return _without_exporter()
    except Exception as e:
        log.warning("lean ExecuTorch import failed (%s); importing the exporter too", e)
        return _plain()


def _plain() -> tuple[types.ModuleType, types.ModuleType]:
    import executorch.extension.training as training
    import executorch.runtime as runtime

    return runtime, training


def _without_exporter() -> tuple[types.ModuleType, types.ModuleType]:
    import executorch
    import torch  # noqa: F401  (the pybindings need libtorch loaded first)

    spec = importlib.util.find_spec(EXIR)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{EXIR} is not a package here")
    bare = types.ModuleType(EXIR)
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    sys.modules[EXIR] = bare
    try:
        import executorch.extension.training as training
        import executorch.runtime as runtime
    finally:
        if sys.modules.get(EXIR) is bare:
            del sys.modules[EXIR]
        if getattr(executorch, "exir", None) is bare:
            del executorch.exir
    return runtime, training
