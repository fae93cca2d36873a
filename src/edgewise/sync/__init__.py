"""Code shared by edge and cloud: the wire codec (and later the hybrid logical clock, merges)."""
