"""Datasets: Fashion-MNIST IDX files and conversion to fdpipe image files."""
