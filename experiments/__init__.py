"""Command-line experiments (absl flags): thin wrappers over the library."""
