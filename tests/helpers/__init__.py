"""Helpers shared by test files (test files do not import each other)."""
