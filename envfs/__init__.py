"""envfs: ready Python environments at a fixed path, served by FUSE."""

__version__ = "0.1.0"
