"""stepdistill: distil slow diffusers pipelines into few-step students (progressive, LCM, LADD)."""

__version__ = "0.1.0"
