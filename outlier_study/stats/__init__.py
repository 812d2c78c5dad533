"""Streaming statistics over hooked activations."""
