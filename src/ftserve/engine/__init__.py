"""Engines behind one async ``Engine`` protocol."""
