"""sgxvtpm.tpm."""
