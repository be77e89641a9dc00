"""SCons integration of igvm-builder (the only subpackage that imports SCons).

Three ways to load the tool (see ``docs/SCONS_TOOL.md``)::

    import igvm_builder.scons
    env = Environment(tools=["default", igvm_builder.scons.generate])          # a callable
    env = Environment(tools=["default", "igvm"], toolpath=[igvm_builder.scons.TOOLPATH])

or copy ``site_scons/site_tools/igvm/`` (a two-line shim) into a project.
"""

from __future__ import annotations

import os

from igvm_builder.scons.tool import exists, generate

__all__ = ["TOOLPATH", "exists", "generate"]

#: A ``toolpath`` directory holding the tool ``igvm`` (``igvm.py``, a shim over :mod:`.tool`).
TOOLPATH = os.path.dirname(os.path.abspath(__file__))
