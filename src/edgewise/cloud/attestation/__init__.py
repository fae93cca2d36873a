"""The control plane's verifier of TPM evidence (docs/security.md, "Hardware-rooted trust").

* `enrolment`: binds a node's identity to its TPM: credentials to the EK for the node key and
  the AK, the CSR signed by the TPM node key (or the TLS key's CSR with the TPM node key's
  signature over it), the EK certificate chain when manufacturer CAs are configured.
* `verifier`: remote attestation: nonces, quotes checked against the allowed measurements (the
  published releases' manifest digests and the allowed agent digests), verdicts.
* `api`: the device routes (TPM enrolment, attestation), the verdict stored (`store.tpm`) and
  a failure turned into the node's quarantine; `models`: their OpenAPI bodies.

* `settings`: the policy's ``cloud serve`` options parsed (selectors that require
  attestation, firmware PCRs, golden firmware sets).

The checks themselves are `edgewise.security.tpm` (pure); this package keeps the state around
them. What a quarantined node may still do is `edgewise.cloud.quarantine`.
"""
