"""Plugins the tests register, kept as real files as a third-party package would ship them."""
