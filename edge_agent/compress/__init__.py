"""`edge-agent optimize`: int8 (dynamic, static QDQ), fp16 and magnitude pruning, each with a
measured report (modes.py does the conversions, data.py reads .npz sets, report.py measures)."""
