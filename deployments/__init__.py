"""Deployment definitions: `python -m deployments.serve` (also `brvo-augment serve`) and ../prefect.yaml."""
