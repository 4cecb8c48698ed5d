"""Task prompt generators (IOI and friends)."""
