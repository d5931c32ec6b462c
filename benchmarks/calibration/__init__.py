"""Calibration set for the anomaly detector: agents it was not tuned on (``matrix.py`` runs them).

``envs`` (Acrobot three ways), ``agents`` (feed-forward and recurrent actor-critics), ``ppo`` (one
CleanRL-style loop under a TelemetryHub), ``sb3_agent`` (Stable-Baselines3's default PPO with
injections), ``matrix`` (the harness: run, record, re-judge, the table).
"""
