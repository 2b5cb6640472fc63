"""sgxvtpm.enclaves."""
