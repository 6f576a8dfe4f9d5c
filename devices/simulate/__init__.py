"""A simulated heterogeneous fleet on one machine: real agents, real coordinator, simulated bodies."""
