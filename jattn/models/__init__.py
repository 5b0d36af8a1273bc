"""Models and their registry."""
