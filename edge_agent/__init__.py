"""edge-agent: an inference daemon for edge fleets (ONNX Runtime behind Triton's KServe v2 gRPC)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
