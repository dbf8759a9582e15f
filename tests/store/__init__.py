"""Tests of envfs.store."""
