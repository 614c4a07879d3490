"""The signature appended to a module, as ``modinfo`` shows it.

A signed module ends with::

    [ module ][ signer ][ key id ][ signature ][ struct module_signature ][ magic ]

``struct module_signature`` is 12 bytes: algo, hash, id_type, signer_len,
key_id_len (one byte each), three bytes of padding, then sig_len as a
big-endian 32-bit integer.  Modern kernels sign with PKCS#7 (id_type 2): the
signer, key id and hash live inside the DER blob, so a small DER walker finds
the first SignerInfo's issuer common name, serial number and digest algorithm,
which is what kmod (built with OpenSSL) prints as ``signer``, ``sig_key`` and
``sig_hashalgo``.
"""

from __future__ import annotations

import struct

from kmodd.record import dataclass

SIG_MAGIC = b"~Module signature appended~\n"
_TRAILER = struct.Struct(">BBBBB3xI")

# Index = the trailer's byte, as in the kernel's enums.
_PKEY_ALGO = ("DSA", "RSA")
_HASH_ALGO = ("md4", "md5", "sha1", "rmd160", "sha256", "sha384", "sha512", "sha224", "sm3")
_ID_TYPE = ("PGP", "X509", "PKCS#7")
_ID_PKCS7 = 2

# DER-encoded OID contents (without tag and length) of the digests kmod names.
_HASH_OIDS: dict[bytes, str] = {
    bytes.fromhex("2a864886f70d0204"): "md4",
    bytes.fromhex("2a864886f70d0205"): "md5",
    bytes.fromhex("2b0e03021a"): "sha1",
    bytes.fromhex("2b24030201"): "rmd160",
    bytes.fromhex("608648016503040201"): "sha256",
    bytes.fromhex("608648016503040202"): "sha384",
    bytes.fromhex("608648016503040203"): "sha512",
    bytes.fromhex("608648016503040204"): "sha224",
    bytes.fromhex("2a811ccf55018311"): "sm3",
}
_OID_COMMON_NAME = bytes.fromhex("550403")

# DER tags used below.
_INTEGER, _OCTET_STRING, _OID = 0x02, 0x04, 0x06
_SEQUENCE, _SET = 0x30, 0x31
_CONTEXT_0_CONSTRUCTED = 0xA0


@dataclass(frozen=True)
class SignatureInfo:
    """What ``modinfo`` reports about a module's signature."""

    id_type: str        # "PKCS#7", "X509" or "PGP"  (modinfo's sig_id)
    algo: str           # trailer's public-key algorithm; constant, modinfo omits it
    hash_algo: str      # modinfo's sig_hashalgo
    signer: str
    key_id: bytes       # for PKCS#7 the issuer serial number, as OpenSSL's BN_bn2bin gives it
    signature: bytes

    @property
    def key_id_hex(self) -> str:
        """``sig_key`` as modinfo prints it."""
        return hex_colon(self.key_id)

    @property
    def signature_hex(self) -> str:
        return hex_colon(self.signature)


def hex_colon(data: bytes) -> str:
    """``01:AB:...`` with a line break and two tabs after every 20 bytes, like kmod."""
    chunks = [":".join(f"{b:02X}" for b in data[i:i + 20]) for i in range(0, len(data), 20)]
    return ":\n\t\t".join(chunks)


class _DerError(ValueError):
    pass


@dataclass(frozen=True)
class _Tlv:
    tag: int
    start: int   # offset of the contents
    end: int     # offset just past the contents


def _tlv(buf: bytes, pos: int, limit: int) -> _Tlv:
    """One DER element at ``pos`` that must end by ``limit``."""
    if pos + 2 > limit:
        raise _DerError("element runs past its container")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise _DerError("multi-byte tags are not used in PKCS#7 signatures")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        # 0x80 is BER's indefinite length, which DER forbids.
        if count == 0 or count > 4 or pos + count > limit:
            raise _DerError("bad length")
        length = int.from_bytes(buf[pos:pos + count], "big")
        pos += count
    if pos + length > limit:
        raise _DerError("element runs past its container")
    return _Tlv(tag, pos, pos + length)


def _children(buf: bytes, parent: _Tlv) -> list[_Tlv]:
    out = []
    pos = parent.start
    while pos < parent.end:
        child = _tlv(buf, pos, parent.end)
        out.append(child)
        pos = child.end
    return out


def _expect(el: _Tlv, tag: int, what: str) -> _Tlv:
    if el.tag != tag:
        raise _DerError(f"{what}: expected tag {tag:#x}, found {el.tag:#x}")
    return el


def _issuer_common_name(buf: bytes, name: _Tlv) -> str | None:
    """The first commonName of an X.501 Name; like kmod, the last attribute if none is a CN."""
    last: bytes | None = None
    for rdn in _children(buf, _expect(name, _SEQUENCE, "issuer")):
        for atv in _children(buf, _expect(rdn, _SET, "issuer RDN")):
            parts = _children(buf, _expect(atv, _SEQUENCE, "issuer attribute"))
            if len(parts) < 2:
                raise _DerError("issuer attribute without value")
            oid = buf[_expect(parts[0], _OID, "attribute type").start:parts[0].end]
            value = buf[parts[1].start:parts[1].end]
            if oid == _OID_COMMON_NAME:
                return _c_string(value)
            last = value
    return None if last is None else _c_string(last)


def _c_string(raw: bytes) -> str:
    # kmod takes the string's bytes up to a NUL (strlen).
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _serial_bytes(raw: bytes) -> bytes:
    """The serial's magnitude without leading zeros, as BN_bn2bin writes it."""
    value = abs(int.from_bytes(raw, "big", signed=True))
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _parse_pkcs7(buf: bytes) -> tuple[str | None, bytes, str, bytes]:
    """(issuer CN, serial, digest name, encrypted digest) of the first SignerInfo."""
    top = _expect(_tlv(buf, 0, len(buf)), _SEQUENCE, "ContentInfo")
    info = _children(buf, top)
    if len(info) < 2:
        raise _DerError("ContentInfo without content")
    explicit = _children(buf, _expect(info[1], _CONTEXT_0_CONSTRUCTED, "content"))
    if not explicit:
        raise _DerError("empty content")
    signed_data = _children(buf, _expect(explicit[0], _SEQUENCE, "SignedData"))
    # version, digestAlgorithms, contentInfo, [0] certificates, [1] crls, signerInfos:
    # the signer infos are the last SET.
    if len(signed_data) < 4:
        raise _DerError("SignedData too short")
    signer_infos = _children(buf, _expect(signed_data[-1], _SET, "signerInfos"))
    if not signer_infos:
        raise _DerError("no SignerInfo")
    si = _children(buf, _expect(signer_infos[0], _SEQUENCE, "SignerInfo"))
    if len(si) < 5:
        raise _DerError("SignerInfo too short")
    # si: version, issuerAndSerialNumber, digestAlgorithm, [0] authAttrs?,
    #     digestEncryptionAlgorithm, encryptedDigest, [1] unauthAttrs?
    ias = _children(buf, _expect(si[1], _SEQUENCE, "issuerAndSerialNumber"))
    if len(ias) != 2:
        raise _DerError("issuerAndSerialNumber is not (issuer, serial)")
    signer = _issuer_common_name(buf, ias[0])
    serial = _expect(ias[1], _INTEGER, "serialNumber")
    key_id = _serial_bytes(buf[serial.start:serial.end])
    digest_alg = _children(buf, _expect(si[2], _SEQUENCE, "digestAlgorithm"))
    if not digest_alg:
        raise _DerError("empty digestAlgorithm")
    oid = _expect(digest_alg[0], _OID, "digest algorithm")
    hash_algo = _HASH_OIDS.get(buf[oid.start:oid.end], "unknown")
    rest = si[3:]
    if rest and rest[0].tag == _CONTEXT_0_CONSTRUCTED:
        rest = rest[1:]
    if len(rest) < 2:
        raise _DerError("SignerInfo without encryptedDigest")
    enc = _expect(rest[1], _OCTET_STRING, "encryptedDigest")
    return signer, key_id, hash_algo, buf[enc.start:enc.end]


def read_signature(image: bytes) -> SignatureInfo | None:
    """The signature of a (decompressed) module image, or None when it has none.

    Like kmod, a trailer that does not add up or a PKCS#7 blob that cannot be
    parsed means "no signature information", not an error.
    """
    end = len(image) - len(SIG_MAGIC)
    if end < 0 or image[end:] != SIG_MAGIC:
        return None
    end -= _TRAILER.size
    if end < 0:
        return None
    algo, hash_, id_type, signer_len, key_id_len, sig_len = _TRAILER.unpack_from(image, end)
    if algo >= len(_PKEY_ALGO) or hash_ >= len(_HASH_ALGO) or id_type >= len(_ID_TYPE):
        return None
    if sig_len == 0 or end < signer_len + key_id_len + sig_len:
        return None
    sig_start = end - sig_len
    blob = image[sig_start:end]
    if id_type == _ID_PKCS7:
        try:
            signer, key_id, hash_algo, signature = _parse_pkcs7(blob)
        except _DerError:
            return None
        return SignatureInfo(id_type=_ID_TYPE[id_type], algo=_PKEY_ALGO[algo],
                             hash_algo=hash_algo, signer=signer or "", key_id=key_id,
                             signature=signature)
    key_start = sig_start - key_id_len
    signer_start = key_start - signer_len
    return SignatureInfo(id_type=_ID_TYPE[id_type], algo=_PKEY_ALGO[algo],
                         hash_algo=_HASH_ALGO[hash_],
                         signer=image[signer_start:key_start].decode("utf-8", errors="replace"),
                         key_id=image[key_start:sig_start], signature=blob)
