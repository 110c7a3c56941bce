"""Built-in backend plugins (registered through the ``harness`` entry-point group)."""
