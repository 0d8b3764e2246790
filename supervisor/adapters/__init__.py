"""Adapters: every module that touches the machine (files under conf.d/ and state/, /proc,
cgroups, signals, ports, NVML, Docker, health probes) behind one boundary each. The runtime calls
them; blocking ones are called off the event loop.
"""
