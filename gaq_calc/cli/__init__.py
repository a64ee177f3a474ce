"""Console entry points: parse flags, call the library."""
