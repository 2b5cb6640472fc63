"""sgxvtpm.host."""
