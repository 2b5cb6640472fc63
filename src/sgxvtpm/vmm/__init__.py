"""sgxvtpm.vmm."""
