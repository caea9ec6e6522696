"""Training: Lightning modules and callbacks, one per task family, sharing one engine."""
