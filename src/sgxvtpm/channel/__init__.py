"""sgxvtpm.channel."""
