"""Evaluation: feature-space FID/KID, the testbed's emoji evaluator, prompt alignment and teacher fidelity."""
