"""Pure core: the declaration models, the launch types (a backend kind's plan), states, backoff,
placement, events and text edits.

Nothing here starts a process, opens a socket or reads /proc; it imports the standard library,
pydantic and tomlkit only, so every piece is tested with hand-built inputs. The lowest layer:
it imports nothing else of the supervisor (tests/test_layers.py keeps it so).
"""
