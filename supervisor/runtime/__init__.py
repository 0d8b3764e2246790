"""The running supervisor: one task per instance (the only writer of its state), the engine that
reconciles declarations against instances, adoption of an earlier supervisor's runs, the
controller behind the API's intents, the GPU tracker and metrics.
"""
