"""Refresh: the scheduler that keeps every cached soft target within a staleness bound."""
