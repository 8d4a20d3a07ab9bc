"""Running as a system service: the systemd notify protocol (notify.py) and what a reload can
change live (reload.py)."""
