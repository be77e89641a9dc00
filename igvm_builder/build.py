"""The former name of :mod:`igvm_builder.assemble` (the assembly of an image from a config).

Kept so that ``from igvm_builder.build import build`` (or ``... import pipeline``) goes on
working; ``import igvm_builder.build.pipeline`` does not: the modules are ``igvm_builder.assemble.*``.
"""

from igvm_builder.assemble import *  # noqa: F403
from igvm_builder.assemble import __all__, launch, mapped, merge, pipeline, plan  # noqa: F401
