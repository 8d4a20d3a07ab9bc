"""The control plane: `edge-agent control-plane serve`. Releases, targets and device state in a
registry (registry.py, SQLite), blobs in a content-addressed store (blobs.py), served over the
fleet protocol (service.py)."""
