"""Backbones (feature extractors) and multiple-instance aggregators."""
