"""Facts about the machine a command runs on. API: ``host_memory.HostMemory`` (peak host memory of a stage,
anonymous and memory-mapped files apart)."""
