"""The shared kernel every package may import: errors (each with its errno and exit code),
settings, the validation of names users give, and crash points for tests.

May import: the standard library and pydantic only; nothing else of envfs.
"""
