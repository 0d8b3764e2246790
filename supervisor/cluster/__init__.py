"""Cluster mode (issue 14): the same conf.d/ drives backends on every node of a Ray cluster.

Layering, so that Ray never runs inside the supervisor's own process (`ray.init` can block
for ever, and Ray terminates a driver about 60 s after it loses its head):

* `plan` (pure): the launch plan of an instance that runs in the cluster;
* `client` (supervisor side, no Ray import): spawns and talks to the driver over a pipe;
* `driver` (a subprocess, the only Ray driver): creates, finds and kills the actors;
* `actor` (runs in a Ray worker on the chosen node): owns one backend process tree;
* `agent` (runs in a Ray worker pinned to each node): samples its GPUs and our runs there,
  reaps, reads logs;
* `nodes` (supervisor side, pure logic over the agents' samples): ownership, strays, the
  GPU gate, the reaper's decisions, node facts for `gpus = "auto"`;
* `binding`: what these need to know of the engine, wired in one place.
"""
