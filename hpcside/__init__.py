"""hpcside: the HPC side of Chat AI. Standard library only (Python >= 3.9); never imports the web side."""

__version__ = "0.1.0"
