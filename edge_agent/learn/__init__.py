"""Learning on the fleet: devices train on their own examples (examples.py, train.py run by
worker.py in a low-priority process), the control plane aggregates their updates asynchronously
(controlplane/learning/) with the pure arithmetic here (delta.py), and each gated improvement
ships back as a signed release. PyTorch (the `learn` extra) is imported only by train.py and
graph.py."""
