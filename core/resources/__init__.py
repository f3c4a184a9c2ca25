"""What holds memory, who is using it, and giving it back: the resource manager and memory probes."""
