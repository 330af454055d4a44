"""The pieces of bench/study.py: settings (config), the per-model run (runner), tables and report (report)."""
