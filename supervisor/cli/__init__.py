"""The command line: `model-supervisor serve|validate|node` (main) and the client commands that
talk to a running supervisor (remote, through api_client)."""

from supervisor.cli.main import main

__all__ = ["main"]
