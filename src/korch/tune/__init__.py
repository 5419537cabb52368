"""Tuning campaigns: search spaces, deadlines, the Optuna study, Ray Tune trials, outputs and hand-off."""
