"""What is declared, settled: parsing declaration files into specs (with the backend kinds),
resolving them into a catalog of instances (GPUs, ports, placements) and the plan that turns
the running set into the declared one; the supervisor's own settings. Pure logic: the I/O it
needs (a port assignment, GPU facts) is handed in.
"""
