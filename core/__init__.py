"""Modules shared by the crawler and the assignment worker (no import of either)."""
