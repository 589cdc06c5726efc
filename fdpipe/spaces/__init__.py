"""Representation-space registry; importing this package registers all families."""

from fdpipe.spaces import demo  # noqa: F401  (registers the demo families)
from fdpipe.spaces import inception  # noqa: F401  (registers 'inception')
from fdpipe.spaces import timm_space  # noqa: F401  (registers 'timm')
from fdpipe.spaces.base import FeatureSpace, SpaceSpec, build_space, families, register_family

__all__ = ["FeatureSpace", "SpaceSpec", "build_space", "families", "register_family"]
