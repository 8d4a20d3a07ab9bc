"""The agent's weight sync: long-poll the control plane, fetch what is missing, verify, install
through the lifecycle's hot-swap path, report (syncer.py); blobs on disk with resume (store.py)."""
