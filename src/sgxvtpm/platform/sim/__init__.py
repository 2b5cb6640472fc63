"""sgxvtpm.platform.sim."""
