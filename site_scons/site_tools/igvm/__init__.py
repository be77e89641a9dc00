"""SCons tool ``igvm`` (copy this directory into a project's site_scons/site_tools/): a shim over igvm_builder."""

from igvm_builder.scons.tool import exists, generate

__all__ = ["exists", "generate"]
