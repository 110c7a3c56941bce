"""Built-in model alias plugins."""
