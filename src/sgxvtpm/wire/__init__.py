"""sgxvtpm.wire."""
