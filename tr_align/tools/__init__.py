"""Tools around the library: the step benchmark and the memory planner."""
