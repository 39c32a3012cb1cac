"""Lightning callbacks: thin adapters around hybridad's pure evaluation functions."""
