"""Tests of envfs.api."""
