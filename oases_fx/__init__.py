"""oases_fx: Oases-style overlapped tensor-model parallelism for unmodified PyTorch models, as a compiler.

    model = oases_fx.compile(model, mesh, example_inputs=(idx, targets))
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _map_source_passes():
    """passes/ sits at the repository's top level (the design card) and is installed as
    oases_fx.passes (setup.cfg package_dir). In a source checkout that is not installed that way,
    load it under the same name, so there is never a global package called `passes`."""
    if "oases_fx.passes" in _sys.modules:
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "passes")):
        return  # installed layout
    src = _os.path.join(_os.path.dirname(here), "passes")
    spec = _ilu.spec_from_file_location("oases_fx.passes", _os.path.join(src, "__init__.py"),
                                        submodule_search_locations=[src])
    if spec is None:
        raise ImportError("oases_fx.passes not found: reinstall oases_fx (pip install .)")
    mod = _ilu.module_from_spec(spec)
    _sys.modules["oases_fx.passes"] = mod
    spec.loader.exec_module(mod)


_map_source_passes()

from oases_fx.api import OasesModule, compile  # noqa: E402
from oases_fx.config import CompileConfig  # noqa: E402
from oases_fx.errors import InputError, OasesError, PlanMismatchError, ShardingError  # noqa: E402
from oases_fx.loading import LoadReport, WeightsNotLoadedError, load_pretrained  # noqa: E402
from oases_fx.plan import Plan, RegionPlan  # noqa: E402

__all__ = ["compile", "OasesModule", "Plan", "RegionPlan", "CompileConfig", "OasesError", "ShardingError",
           "InputError", "PlanMismatchError", "load_pretrained", "LoadReport", "WeightsNotLoadedError"]
