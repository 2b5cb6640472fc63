"""sgxvtpm.endpoint."""
