"""Analyses a step or a report draws on: the usefulness protocol and its subsets, the stage trend, image
quality, champion and challenger."""
