"""Inference, export formats and checkpoint importers."""
