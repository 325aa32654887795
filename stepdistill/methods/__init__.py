"""Distillation methods: each supplies data, loss and export to the shared training loop."""
