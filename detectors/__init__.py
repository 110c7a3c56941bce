"""Built-in detector plugins (registered through the ``harness`` entry-point group)."""
