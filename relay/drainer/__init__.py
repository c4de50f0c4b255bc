"""drainer package."""
