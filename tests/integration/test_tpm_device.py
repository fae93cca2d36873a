"""The node's TPM (swtpm): keys made inside it, CSRs it signs, a key file useless elsewhere,
PCR extends, quotes, sealing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from cryptography import x509

import swtpm
from edgewise.security import pki
from edgewise.security.tpm import KeyBlob, Tpm, TpmError

swtpm_factory, tpm_tcti = swtpm.swtpm_factory, swtpm.tpm_tcti  # fixtures


def test_csr_signed_through_the_tpm_names_the_tpm_key(tpm_tcti: str) -> None:
    with Tpm(tpm_tcti) as tpm:
        blob = tpm.create_key("node")
        with tpm.signer(blob) as key:
            csr = x509.load_pem_x509_csr(pki.make_csr(key))
            fingerprint = pki.public_key_fingerprint(key)
            signature = pki.sign_challenge(key, b"n" * 16)
    assert csr.is_signature_valid
    assert pki.public_key_fingerprint(csr) == fingerprint
    pki.verify_challenge(csr, b"n" * 16, signature)
    # the file holds no private key cryptography could read: only the TPM-wrapped blob
    assert blob.pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    with pytest.raises(ValueError):
        from cryptography.hazmat.primitives import serialization
        serialization.load_pem_private_key(blob.pem, None)


def test_a_copied_key_file_is_useless_in_another_tpm(
    swtpm_factory: Callable[[str], str], tmp_path
) -> None:
    path = tmp_path / "node.tpmkey"
    with Tpm(swtpm_factory("a")) as tpm:
        tpm.create_key("node").save(path)
    with Tpm(swtpm_factory("b")) as other, pytest.raises(TpmError, match="loading a key"), \
            other.signer(KeyBlob.read(path)):
        pass


def test_pcr_extend_and_quote(tpm_tcti: str) -> None:
    digest = hashlib.sha256(b"agent").digest()
    with Tpm(tpm_tcti) as tpm:
        assert tpm.read_pcrs([16]) == {16: bytes(32)}
        tpm.extend(16, digest)
        assert tpm.read_pcrs([16]) == {16: hashlib.sha256(bytes(32) + digest).digest()}
        ak = tpm.create_key("ak")
        attest, signature = tpm.quote(ak, b"x" * 32, [16])
    assert len(attest) > 32 and len(signature) > 64


def test_sealed_secret_opens_only_in_its_tpm(swtpm_factory: Callable[[str], str]) -> None:
    with Tpm(swtpm_factory("a")) as tpm:
        sealed = tpm.seal(b"k" * 32)
        assert tpm.unseal(sealed) == b"k" * 32
    with Tpm(swtpm_factory("b")) as other, pytest.raises(TpmError):
        other.unseal(sealed)


def test_ek_is_stable_and_activation_needs_the_challenged_tpm(
    swtpm_factory: Callable[[str], str],
) -> None:
    from edgewise.security.tpm.credential import make_challenge

    tcti = swtpm_factory("a")
    with Tpm(tcti) as tpm:
        ek = tpm.ek_public()
        node = tpm.create_key("node")
    with Tpm(tcti) as tpm:
        assert tpm.ek_public() == ek  # from the endorsement seed: the same EK every time
        challenge = make_challenge(ek, node.public_area())
        assert tpm.activate_credential(node, challenge.blob, challenge.secret) == \
            challenge.expected
    # another TPM claims TPM a's EK (its public key is no secret) for a key of its own:
    # the credential is encrypted to EK a, so TPM b cannot recover it
    with Tpm(swtpm_factory("b")) as other:
        own = other.create_key("node")
        challenge = make_challenge(ek, own.public_area())
        with pytest.raises(TpmError, match="activating"):
            other.activate_credential(own, challenge.blob, challenge.secret)


def test_ek_certificate_from_the_tpm_checked_against_the_makers_ca(
    swtpm_factory: Callable[..., str],
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from edgewise.security.tpm.credential import AttestationRefused, check_ek_certificate

    with Tpm(swtpm_factory("made", ek_cert=True)) as tpm:
        cert = tpm.ek_certificate()
        ek = tpm.ek_public()
    # the local CA's certificate exists once swtpm_setup has made an EK certificate (on a
    # fresh machine, not before: CI once read it first)
    issuer = x509.load_pem_x509_certificate(swtpm.localca_issuer().read_bytes())
    with Tpm(swtpm_factory("plain")) as plain:
        assert plain.ek_certificate() is None  # no certificate in NV
        other_ek = plain.ek_public()
    assert cert is not None
    der = cert.public_bytes(Encoding.DER)
    check_ek_certificate(der, ek, [issuer])  # read from NV, issued by the maker's CA
    with pytest.raises(AttestationRefused, match="certifies another key"):
        check_ek_certificate(der, other_ek, [issuer])
    with pytest.raises(AttestationRefused, match="not issued by a configured manufacturer"):
        check_ek_certificate(der, ek, [cert])  # not a CA of it
