"""Shared code of the ControlNet++ codebase (no import-time side effects)."""
