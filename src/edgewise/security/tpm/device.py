"""One TPM 2.0, through tpm2-pytss's ESAPI: the keys that never leave it and what it signs.

`Tpm(tcti)` opens a TPM by its TCTI string: ``swtpm:port=2321`` (the software TPM the tests
start), ``device:/dev/tpmrm0`` (the kernel's resource manager on real hardware). It holds:

* the **endorsement key** (EK, RSA 2048, the TCG EK Credential Profile's template, created from
  the TPM's endorsement seed, so the same EK every time; its certificate is read from the TPM's
  NV index when the manufacturer put one there): `ek_public`, `ek_certificate`;
* the **node key** (ECDSA P-256, unrestricted signing: CSRs and proof-of-possession challenges)
  and the **attestation key** (AK, ECDSA P-256, *restricted* signing: only quotes of the TPM's
  own state, so nothing signed elsewhere can pass for a quote). Both are created under the
  storage primary key with ``fixedTPM | fixedParent | sensitiveDataOrigin``: the TPM made them
  and will not export them. What is stored on disk is their TSS2 PRIVATE KEY PEM (the format
  the tpm2 OpenSSL provider reads): the private part encrypted by the TPM's storage key,
  useless in any other TPM (`create_key`, `load_key`);
* sealed data (`seal` / `unseal`): a small secret (the outbox key) that only this TPM opens.

Every call blocks on the TPM (milliseconds for swtpm, up to about 100 ms on a hardware TPM):
async callers run them in a thread. A `Tpm` is not thread-safe: one caller at a time.
Failures become `TpmError` (a `StorageError`: the node's own hardware); tpm2-pytss's
`TSS2_Exception` never escapes this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.errors import ConfigError, StorageError

# libtss2 logs every TPM error response to stderr (an EK certificate index that is not there
# is an "ERROR"); we raise `TpmError` for the ones that matter. TSS2_LOG set by the user wins.
os.environ.setdefault("TSS2_LOG", "all+none")

try:  # the `tpm` extra: tpm2-pytss, and libtss2 under it
    from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_RH, TPM2_SE
    from tpm2_pytss.cryptography import tpm_ecc_private_key
    from tpm2_pytss.tsskey import TSSPrivKey
    from tpm2_pytss.types import (
        TPM2B_ENCRYPTED_SECRET,
        TPM2B_ID_OBJECT,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPML_DIGEST_VALUES,
        TPMT_HA,
        TPMT_PUBLIC,
        TPMT_SYM_DEF,
    )
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template
except ImportError as exc:  # pragma: no cover - depends on the installation
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

EK_TYPE = "EK-RSA2048"
_KEY_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth"
NODE_KEY_TEMPLATE = ("ecc256:ecdsa-sha256", "sign|" + _KEY_ATTRS)
AK_TEMPLATE = ("ecc256:ecdsa-sha256", "restricted|sign|" + _KEY_ATTRS)
_SEAL_ATTRS = "fixedtpm|fixedparent|userwithauth"
MAX_SEALED = 128  # a TPM seals at most MAX_SYM_DATA (128) bytes


class TpmError(StorageError):
    """The TPM refused or failed a command, or is not there."""


def available() -> str | None:
    """None when tpm2-pytss and libtss2 can be used here, else why not."""
    if _IMPORT_ERROR is not None:
        return (f"tpm2-pytss is not installed ({_IMPORT_ERROR}); "
                "pip install 'edgewise[tpm]' (needs libtss2, Debian: libtss2-dev)")
    return None


@contextmanager
def _tpm_errors(what: str) -> Iterator[None]:
    try:
        yield
    except TSS2_Exception as exc:
        raise TpmError(f"TPM: {what} failed ({exc})") from None


@dataclass(frozen=True)
class KeyBlob:
    """A TPM object as stored on disk: its TSS2 PRIVATE KEY PEM."""

    pem: bytes

    def public_area(self) -> bytes:
        """The marshalled TPMT_PUBLIC (what the control plane needs to make a credential)."""
        return bytes(TSSPrivKey.from_pem(self.pem).public.publicArea.marshal())

    def save(self, path: str | os.PathLike[str]) -> None:
        from edgewise.common.files import write_atomic

        write_atomic(path, self.pem, mode=0o600)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> KeyBlob:
        try:
            return cls(Path(path).read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"no TPM key at {path}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _template(spec: tuple[str, str]) -> Any:
    alg, attrs = spec
    public = TPMT_PUBLIC.parse(alg, objectAttributes=attrs)
    public.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL  # a signing key
    return public


class Tpm:
    """An open TPM. Use as a context manager, or call `close`."""

    def __init__(self, tcti: str) -> None:
        why = available()
        if why is not None:
            raise ConfigError(why)
        name, _, conf = tcti.partition(":")
        if not name:
            raise ConfigError(f"bad TPM TCTI {tcti!r}: use e.g. device:/dev/tpmrm0 or "
                              "swtpm:port=2321")
        self.tcti = tcti
        with _tpm_errors(f"opening {tcti}"):
            self._ctx = ESAPI(TCTILdr(name, conf))
        self._ek: Any = None
        self._ek_public: Any = None
        self._ek_cert: bytes | None = None

    def close(self) -> None:
        if self._ek is not None:
            with _tpm_errors("flushing the EK"):
                self._ctx.flush_context(self._ek)
            self._ek = None
        self._ctx.close()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endorsement key --------------------------------------------------------------------
    def _nv_read(self, index: int) -> bytes:
        try:
            handle = self._ctx.tr_from_tpmpublic(index)
        except TSS2_Exception as exc:
            if exc.error == TPM2_RC.HANDLE:  # no such NV index: no certificate there
                raise NoSuchIndex(index) from None
            raise
        public, _ = self._ctx.nv_read_public(handle)
        size = public.nvPublic.dataSize
        data, offset = b"", 0
        while offset < size:
            chunk = bytes(self._ctx.nv_read(handle, min(size - offset, 1024), offset,
                                            auth_handle=handle))
            data += chunk
            offset += len(chunk)
        return data

    def _load_ek(self) -> Any:
        if self._ek is None:
            with _tpm_errors("creating the endorsement key"):
                cert, template = create_ek_template(EK_TYPE, self._nv_read)
                handle, public, *_ = self._ctx.create_primary(
                    TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
            self._ek, self._ek_public, self._ek_cert = handle, public.publicArea, cert
        return self._ek

    def ek_public(self) -> bytes:
        """The EK's marshalled TPMT_PUBLIC."""
        self._load_ek()
        return bytes(self._ek_public.marshal())

    def ek_certificate(self) -> x509.Certificate | None:
        """The manufacturer's EK certificate from the TPM's NV index, if it has one."""
        self._load_ek()
        if not self._ek_cert:
            return None
        try:
            return x509.load_der_x509_certificate(self._ek_cert)
        except ValueError:
            raise TpmError("the TPM's EK certificate is not readable DER") from None

    # -- keys -------------------------------------------------------------------------------
    def create_key(self, kind: str = "node") -> KeyBlob:
        """Create a node key (``node``) or an attestation key (``ak``) inside the TPM."""
        spec = {"node": NODE_KEY_TEMPLATE, "ak": AK_TEMPLATE}.get(kind)
        if spec is None:
            raise ValueError(f"unknown key kind {kind!r}")
        with _tpm_errors(f"creating the {kind} key"):
            return KeyBlob(TSSPrivKey.create(self._ctx, _template(spec)).to_pem())

    @contextmanager
    def loaded(self, blob: KeyBlob) -> Iterator[Any]:
        """The key loaded in the TPM for the block (flushed after): an ESYS_TR handle."""
        with _tpm_errors("loading a key (made by another TPM?)"):
            handle = TSSPrivKey.from_pem(blob.pem).load(self._ctx)
        try:
            yield handle
        finally:
            with _tpm_errors("flushing a key"):
                self._ctx.flush_context(handle)

    @contextmanager
    def signer(self, blob: KeyBlob) -> Iterator[ec.EllipticCurvePrivateKey]:
        """The node key as a `cryptography` private key whose signatures the TPM makes
        (usable with the x509 builders: `edgewise.security.pki.make_csr`)."""
        with self.loaded(blob) as handle:
            yield tpm_ecc_private_key(self._ctx, handle)

    # -- credential activation (enrolment) --------------------------------------------------
    def activate_credential(self, blob: KeyBlob, credential_blob: bytes, secret: bytes) -> bytes:
        """Recover the control plane's secret: the TPM decrypts it with the EK only if the key
        ``blob`` (whose name the credential is bound to) is loaded in this same TPM."""
        ek = self._load_ek()
        cred, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        enc, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(secret)
        with self.loaded(blob) as key, _tpm_errors("activating the credential"):
            session = self._ctx.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
            try:  # the EK's policy: PolicySecret(endorsement hierarchy)
                self._ctx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                digest = self._ctx.activate_credential(
                    key, ek, cred, enc, session1=ESYS_TR.PASSWORD, session2=session)
            finally:
                self._ctx.flush_context(session)
        return bytes(digest)

    # -- PCRs and quotes --------------------------------------------------------------------
    def extend(self, pcr: int, digest: bytes) -> None:
        """Extend SHA-256 bank PCR ``pcr`` with a 32-byte digest."""
        if len(digest) != 32:
            raise ValueError("a SHA-256 digest is 32 bytes")
        value = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        value.digest.sha256 = digest
        values = TPML_DIGEST_VALUES([value])
        with _tpm_errors(f"extending PCR {pcr}"):
            self._ctx.pcr_extend(ESYS_TR.PCR0 + pcr, values)

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """SHA-256 bank values of ``pcrs``, read 8 at a time (TPM2_PCR_Read returns at most
        8 digests per call)."""
        wanted, out = sorted(set(pcrs)), {}
        for i in range(0, len(wanted), 8):
            part = wanted[i:i + 8]
            with _tpm_errors("reading PCRs"):
                _, _, digests = self._ctx.pcr_read(_selection(part))
            if len(digests) != len(part):
                raise TpmError(f"the TPM returned {len(digests)} of {len(part)} PCR values")
            out.update({p: bytes(d) for p, d in zip(part, digests, strict=True)})
        return out

    def quote(self, ak: KeyBlob, nonce: bytes, pcrs: Sequence[int]) -> tuple[bytes, bytes]:
        """A quote over the SHA-256 bank of ``pcrs`` with ``nonce`` as its qualifying data,
        signed by the AK: (marshalled TPMS_ATTEST, marshalled TPMT_SIGNATURE)."""
        with self.loaded(ak) as handle, _tpm_errors("quoting"):
            attest, signature = self._ctx.quote(handle, _selection(pcrs), nonce)
        return bytes(attest), bytes(signature.marshal())

    # -- sealing ----------------------------------------------------------------------------
    def seal(self, secret: bytes) -> KeyBlob:
        """Seal up to 128 bytes under the storage key: only this TPM can `unseal` them."""
        if not 0 < len(secret) <= MAX_SEALED:
            raise ValueError(f"seal 1 to {MAX_SEALED} bytes")
        sensitive = TPM2B_SENSITIVE_CREATE()
        sensitive.sensitive.data = secret
        with _tpm_errors("sealing"):
            # the parent TSSPrivKey.load uses: the owner hierarchy's storage primary key
            parent = TSSPrivKey._getparent(self._ctx, TPM2_ALG.ECC, TPM2_RH.OWNER)
            try:
                template = TPM2B_PUBLIC(publicArea=TPMT_PUBLIC.parse(
                    "keyedhash", objectAttributes=_SEAL_ATTRS))
                private, public, *_ = self._ctx.create(parent, sensitive, template)
            finally:
                self._ctx.flush_context(parent)
        return KeyBlob(TSSPrivKey(private, public).to_pem())

    def unseal(self, blob: KeyBlob) -> bytes:
        with self.loaded(blob) as handle, _tpm_errors("unsealing"):
            return bytes(self._ctx.unseal(handle))


def _selection(pcrs: Sequence[int]) -> str:
    if not pcrs or any(not 0 <= p <= 23 for p in pcrs):
        raise ValueError("PCRs are 0 to 23")
    return "sha256:" + ",".join(str(p) for p in sorted(set(pcrs)))
