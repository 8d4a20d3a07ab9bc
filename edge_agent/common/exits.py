"""The process exit codes of every `edge-agent` command, defined once (docs/reference/cli.md
lists them, generated from here)."""

from __future__ import annotations

EXIT_OK = 0
# A command that failed and said why in one line on stderr (a control plane's refusal, a model
# that does not load, an accuracy gate).
EXIT_FAILED = 1
# The daemon's second SIGTERM/SIGINT: it exits at once, in-flight work abandoned.
EXIT_FORCED = 1
# sysexits EX_CONFIG: systemd and operators can tell a bad config from a crash.
EXIT_CONFIG = 78
# `learn start --wait` stopped by Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
