"""Layer 5: measurement: timing, results, environment, memory, reports. Torch-free."""
