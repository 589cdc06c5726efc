"""fdpipe: Frechet-distance loss and FDr^k evaluation for image generators."""

__version__ = "0.1.0"
