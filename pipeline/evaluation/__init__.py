"""Evaluation: scores collected as they stream, the bootstrap policy, a run's numbers as types, alarms."""
