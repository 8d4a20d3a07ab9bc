"""The agent's weight sync: long-poll the control plane, fetch what is missing, verify, install
through the lifecycle's hot-swap path, report (syncer.py); the blobs it downloads live in
common/device_blobs.py, shared with local training."""
