"""Generators: the sampling protocol, the built-in flow model and plug-in loading."""

from fdpipe.generators.base import check_generator, load_generator

__all__ = ["check_generator", "load_generator"]
