"""Tests of envfs.node."""
