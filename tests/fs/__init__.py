"""Tests of envfs.fs."""
