"""Code shared by edge and cloud: the wire codec (`codec`), the hybrid logical clock (`hlc`),
last-writer-wins merges with an audit trail (`merge`) and versioned twin state (`twin_state`)."""
