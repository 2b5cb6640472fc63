"""Helpers for sgxvtpm's own tests (real processes, no mocks)."""
