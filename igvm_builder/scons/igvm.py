"""The SCons tool ``igvm`` for ``toolpath=[igvm_builder.scons.TOOLPATH]``: a shim over the real tool.

SCons imports this file as a top-level module named ``igvm``, so it uses absolute imports only.
"""

from igvm_builder.scons.tool import exists, generate

__all__ = ["exists", "generate"]
