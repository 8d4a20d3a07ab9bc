"""The agent's weight sync: long-poll the control plane (syncer.py, through calls.py), bring each
model to its desired version (converge.py: fetch.py brings the files, then verify, assemble and
hand over to the lifecycle's hot-swap path through onloop.py), report (reports.py); what must
survive a restart is state.py. The blobs it downloads live in common/device_blobs.py, shared with
local training."""
