"""Orchestration: composes the model library (`dreamcache`) and persistence (`db`)."""
