"""Generated protobuf and gRPC stubs (scripts/generate_protos.py); never edited by hand.

These modules register the `inference.*` protobuf names in the process-wide descriptor pool, as
tritonclient's own stubs do: the two cannot be imported into one process. Tests therefore talk to
the daemon in a subprocess and import only tritonclient.
"""
