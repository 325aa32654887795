"""Gradio demo of step counts: ``stepdistill demo`` or ``python -m stepdistill.demo`` (needs the [demo] extra)."""
