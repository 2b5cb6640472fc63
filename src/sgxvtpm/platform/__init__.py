"""sgxvtpm.platform."""
