"""The control plane: `edge-agent control-plane serve` (server.py, the composition root).

Releases, rollouts, devices, reports and learning tasks in a registry (registry/, one module per
aggregate, over SQLite or PostgreSQL through database.py); blobs in a content-addressed store
(blobs.py, or S3 through s3.py); the fleet protocol served by service.py, one module per group of
RPCs (publishing, devicesync, enrollment, learningcalls over shared.py); the parameter server in
learning/; the read-only dashboard in dashboard.py; serve's defaults in defaults.py."""
