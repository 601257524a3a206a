"""The kernels quantflow's runtimes run: each module names its weight layout at the top and keeps a reference."""
