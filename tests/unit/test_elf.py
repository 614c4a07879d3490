"""ELF inspection: .modinfo, vermagic and signatures, checked against the real modinfo."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kmodd.cli import kmodctl
from kmodd.modfile.elf import ModuleFileError, Param, modinfo_from_image, read_modinfo, vermagic
from kmodd.modfile.signature import SIG_MAGIC, hex_colon, read_signature
from tests import fixtures

# ---------------------------------------------------------------------------
# Hand-made ELF files and PKCS#7 blobs (no compiler or openssl needed)

SHT_PROGBITS, SHT_STRTAB, SHT_NOBITS = 1, 3, 8


def make_elf(sections: list[tuple[str, bytes]], *, elfclass: int = 64,
             nobits: tuple[str, ...] = ()) -> bytes:
    """A little-endian relocatable ELF holding the given sections."""
    is64 = elfclass == 64
    ehsize, shentsize = (64, 64) if is64 else (52, 40)
    names = [n for n, _ in sections] + [".shstrtab"]
    shstrtab = b"\0"
    name_off = {}
    for n in names:
        name_off[n] = len(shstrtab)
        shstrtab += n.encode() + b"\0"
    body = b""
    placed = []
    for n, data in [*sections, (".shstrtab", shstrtab)]:
        placed.append((n, ehsize + len(body), len(data)))
        if n not in nobits:
            body += data
    shoff = ehsize + len(body)
    shdrs = [b"\0" * shentsize]
    for n, off, size in placed:
        kind = SHT_STRTAB if n == ".shstrtab" else SHT_NOBITS if n in nobits else SHT_PROGBITS
        if is64:
            shdrs.append(struct.pack("<IIQQQQIIQQ", name_off[n], kind, 0, 0, off, size,
                                     0, 0, 1, 0))
        else:
            shdrs.append(struct.pack("<IIIIIIIIII", name_off[n], kind, 0, 0, off, size,
                                     0, 0, 1, 0))
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + b"\0" * 9
    count, strndx = len(shdrs), len(shdrs) - 1
    if is64:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, ehsize, 0, 0,
                                   shentsize, count, strndx)
    else:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", 1, 3, 1, 0, 0, shoff, 0, ehsize, 0, 0,
                                   shentsize, count, strndx)
    return ehdr + body + b"".join(shdrs)


def modinfo_section(*entries: str, padding: int = 0) -> bytes:
    return b"".join(b"\0" * padding + e.encode() + b"\0" for e in entries)


def der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def seq(*parts: bytes) -> bytes:
    return der(0x30, b"".join(parts))


def oid(hexstr: str) -> bytes:
    return der(0x06, bytes.fromhex(hexstr))


OID_SHA256 = "608648016503040201"
OID_SHA512 = "608648016503040203"
OID_CN, OID_O = "550403", "55040a"


def name(*attrs: tuple[str, str]) -> bytes:
    return seq(*(der(0x31, seq(oid(o), der(0x0C, v.encode()))) for o, v in attrs))


def pkcs7(*, issuer: bytes, serial: bytes, digest_oid: str = OID_SHA256,
          signature: bytes = b"\x11" * 32, auth_attrs: bool = False,
          certificates: bool = True) -> bytes:
    alg = seq(oid(digest_oid), der(0x05, b""))
    signer_info = seq(
        der(0x02, b"\x01"),
        seq(issuer, der(0x02, serial)),
        alg,
        *([der(0xA0, seq(oid("2a864886f70d010903"), der(0x31, oid("2a864886f70d010701"))))]
          if auth_attrs else []),
        seq(oid("2a864886f70d010101"), der(0x05, b"")),
        der(0x04, signature),
    )
    signed_data = seq(
        der(0x02, b"\x01"),
        der(0x31, alg),
        seq(oid("2a864886f70d010701")),
        *([der(0xA0, seq(seq(der(0x02, b"\x05"))))] if certificates else []),
        der(0x31, signer_info),
    )
    return seq(oid("2a864886f70d010702"), der(0xA0, signed_data))


def sign(image: bytes, blob: bytes, *, id_type: int = 2, algo: int = 0, hash_: int = 0,
         signer: bytes = b"", key_id: bytes = b"") -> bytes:
    trailer = struct.pack(">BBBBB3xI", algo, hash_, id_type, len(signer), len(key_id), len(blob))
    return image + signer + key_id + blob + trailer + SIG_MAGIC


BASIC = make_elf([
    (".text", b"\x90" * 16),
    (".modinfo", modinfo_section(
        "license=GPL", "alias=pci:v00001234d*sv*sd*bc*sc*i*", "depends=foo,bar-baz",
        "parmtype=level:int", "parm=level:Debug level", "parm=quiet:Be quiet",
        "flagonly", "alias=fake-alias", "author=A <a@example.org>", "author=B",
        "softdep=pre: crc32c", "firmware=fake/fw.bin", "intree=Y", "retpoline=Y",
        "name=fake_mod", "parmtype=speed:uint",
        "vermagic=9.9.9-other SMP preempt mod_unload modversions ",
        padding=3)),
])


# ---------------------------------------------------------------------------
# Synthetic modules


def test_modinfo_fields_of_a_synthetic_module(tmp_path: Path) -> None:
    path = tmp_path / "fake-mod.ko"
    path.write_bytes(BASIC)
    info = read_modinfo(path)
    assert info.filename == str(path)
    assert info.name == "fake_mod"
    assert info.aliases == ["pci:v00001234d*sv*sd*bc*sc*i*", "fake-alias"]
    assert info.depends == ["foo", "bar-baz"]
    assert info.softdep == ["pre: crc32c"]
    assert info.license == "GPL"
    assert info.author == ["A <a@example.org>", "B"]
    assert info.firmware == ["fake/fw.bin"]
    assert info.intree and info.retpoline
    assert info.vermagic == "9.9.9-other SMP preempt mod_unload modversions "
    assert info.parm == [Param("level", "int", "Debug level"), Param("quiet", None, "Be quiet"),
                         Param("speed", "uint", None)]
    # Section order kept, NUL padding skipped, a key without '=' has an empty value.
    assert info.fields[:3] == [("license", "GPL"), ("alias", "pci:v00001234d*sv*sd*bc*sc*i*"),
                               ("depends", "foo,bar-baz")]
    assert ("flagonly", "") in info.fields
    assert info.signature is None and info.signer is None and info.sig_key is None
    assert vermagic(path) == info.vermagic


def test_empty_depends_and_missing_fields() -> None:
    image = make_elf([(".modinfo", modinfo_section("depends=", "name=x"))])
    info = modinfo_from_image(image, "x.ko")
    assert info.depends == []
    assert info.vermagic is None and info.license is None and info.description is None
    assert not info.intree and not info.retpoline


def test_vermagic_key_must_start_an_entry(tmp_path: Path) -> None:
    path = tmp_path / "m.ko"
    path.write_bytes(make_elf([(".modinfo", modinfo_section(
        "description=not a vermagic=here", "vermagic=real one"))]))
    assert vermagic(path) == "real one"
    path.write_bytes(make_elf([(".modinfo", modinfo_section("description=xvermagic=no"))]))
    assert vermagic(path) is None


@pytest.mark.parametrize("elfclass,offset", [(64, 24), (32, 12)])
def test_name_from_this_module_when_modinfo_has_none(elfclass: int, offset: int) -> None:
    this_module = b"\0" * offset + b"from_struct\0".ljust(56, b"\0") + b"\0" * 64
    image = make_elf([(".modinfo", modinfo_section("license=GPL")),
                      (".gnu.linkonce.this_module", this_module)], elfclass=elfclass)
    assert modinfo_from_image(image, "/x/other-name.ko").name == "from_struct"


def test_name_falls_back_to_file_name() -> None:
    image = make_elf([(".modinfo", modinfo_section("license=GPL"))])
    assert modinfo_from_image(image, "/x/some-mod.ko.xz").name == "some_mod"


def test_nobits_modinfo_is_empty() -> None:
    image = make_elf([(".modinfo", b"\0" * 32)], nobits=(".modinfo",))
    assert modinfo_from_image(image, "m.ko").fields == []


# ---------------------------------------------------------------------------
# Signatures


def test_pkcs7_signature_fields() -> None:
    blob = pkcs7(issuer=name((OID_O, "Org"), (OID_CN, "Test signing key"), (OID_O, "Later")),
                 serial=bytes.fromhex("00C1A2B3"), signature=b"\xAB" * 40, auth_attrs=True)
    info = modinfo_from_image(sign(BASIC, blob), "m.ko")
    sig = info.signature
    assert sig is not None
    assert (sig.id_type, sig.signer, sig.hash_algo) == ("PKCS#7", "Test signing key", "sha256")
    # A positive serial with its sign byte: BN_bn2bin drops the leading zero.
    assert sig.key_id == bytes.fromhex("C1A2B3") and info.sig_key == "C1:A2:B3"
    assert sig.signature == b"\xAB" * 40
    # The ELF part is unaffected by the trailer.
    assert info.name == "fake_mod"
    keys = [k for k, _ in info.info_list()]
    assert keys[-5:] == ["sig_id", "signer", "sig_key", "sig_hashalgo", "signature"]


def test_pkcs7_without_common_name_uses_last_attribute() -> None:
    # kmod's x509_name_to_str stops at the first CN; without one it returns the last entry.
    blob = pkcs7(issuer=name((OID_O, "First"), (OID_O, "Last")), serial=b"\x05",
                 digest_oid=OID_SHA512, certificates=False)
    sig = read_signature(sign(b"image", blob))
    assert sig is not None
    assert (sig.signer, sig.hash_algo, sig.key_id) == ("Last", "sha512", b"\x05")


def test_pkcs7_unknown_digest_and_long_serial() -> None:
    serial = bytes(range(1, 26))   # 25 bytes: sig_key wraps like modinfo after 20
    blob = pkcs7(issuer=name((OID_CN, "k")), serial=serial, digest_oid="2a0304")
    sig = read_signature(sign(b"image", blob))
    assert sig is not None and sig.hash_algo == "unknown"
    assert sig.key_id_hex == hex_colon(serial)
    assert sig.key_id_hex.count("\n\t\t") == 1
    assert sig.key_id_hex.startswith("01:02:") and sig.key_id_hex.endswith(":18:19")


def test_x509_style_trailer() -> None:
    # id_type 1: signer and key id are stored in the clear before the signature.
    data = sign(b"image", b"SIGNATURE", id_type=1, algo=1, hash_=2, signer=b"Vendor",
                key_id=b"\x01\xff")
    sig = read_signature(data)
    assert sig is not None
    assert (sig.id_type, sig.algo, sig.hash_algo, sig.signer) == ("X509", "RSA", "sha1", "Vendor")
    assert sig.key_id_hex == "01:FF" and sig.signature == b"SIGNATURE"


@pytest.mark.parametrize("data", [
    b"",
    SIG_MAGIC,                                                  # no room for the trailer
    b"x" * 20 + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 0) + SIG_MAGIC,      # sig_len 0
    b"x" * 20 + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 500) + SIG_MAGIC,    # too long
    b"x" * 20 + struct.pack(">BBBBB3xI", 0, 0, 7, 0, 0, 4) + SIG_MAGIC,      # bad id type
    b"x" * 20 + struct.pack(">BBBBB3xI", 0, 9, 1, 0, 0, 4) + SIG_MAGIC,      # bad hash
    sign(b"image", b"\x30\x03\x02\x01"),                        # DER running past its end
    sign(b"image", b"not DER at all"),
    sign(b"image", pkcs7(issuer=name((OID_CN, "k")), serial=b"\x01")[:-3]),  # cut blob
    sign(b"image", b"\x30\x80" + b"\0" * 8),                    # BER indefinite length
])
def test_unusable_trailers_mean_no_signature(data: bytes) -> None:
    # Like kmod: a trailer that does not add up is "unsigned", never an exception.
    assert read_signature(data) is None


# ---------------------------------------------------------------------------
# Things that are not modules


def _expect_module_error(path: Path, reason: str) -> None:
    with pytest.raises(ModuleFileError) as exc:
        read_modinfo(path)
    assert exc.value.path == str(path)
    assert reason in exc.value.reason, exc.value.reason
    with pytest.raises(ModuleFileError):
        vermagic(path)


def test_not_elf(tmp_path: Path) -> None:
    (tmp_path / "text.ko").write_text("hello\n")
    _expect_module_error(tmp_path / "text.ko", "not an ELF file")
    (tmp_path / "empty.ko").write_bytes(b"")
    _expect_module_error(tmp_path / "empty.ko", "not an ELF file")


def test_elf_without_modinfo(tmp_path: Path) -> None:
    path = tmp_path / "prog.ko"
    path.write_bytes(make_elf([(".text", b"\xc3")]))
    _expect_module_error(path, "without a .modinfo section")
    # A real program is ELF too, and still not a module.
    true = Path(shutil.which("true") or "/bin/true").resolve()
    _expect_module_error(true, "without a .modinfo section")


def test_truncated_elf(tmp_path: Path) -> None:
    path = tmp_path / "cut.ko"
    path.write_bytes(BASIC[:-10])       # section headers sit at the end
    _expect_module_error(path, "truncated")
    path.write_bytes(BASIC[:40])        # not even a whole ELF header
    _expect_module_error(path, "corrupt ELF")


def test_section_past_end_of_file(tmp_path: Path) -> None:
    # Point .modinfo's sh_size far past the end of the file.
    image = bytearray(BASIC)
    shoff = struct.unpack_from("<Q", image, 0x28)[0]
    modinfo_hdr = shoff + 2 * 64
    struct.pack_into("<Q", image, modinfo_hdr + 0x20, 1 << 30)
    path = tmp_path / "big.ko"
    path.write_bytes(bytes(image))
    _expect_module_error(path, "runs past the end")


def test_corrupt_compressed_module(tmp_path: Path) -> None:
    import lzma
    data = lzma.compress(BASIC, check=lzma.CHECK_CRC32)
    path = tmp_path / "m.ko.xz"
    path.write_bytes(data[:-20])
    _expect_module_error(path, "xz stream")


def test_garbage_headers_never_escape_as_other_exceptions() -> None:
    """Random damage to the ELF and section headers: ModuleFileError or a result, nothing else."""
    rng = random.Random(1234)
    shoff = struct.unpack_from("<Q", BASIC, 0x28)[0]
    regions = [(4, 64), (shoff, len(BASIC))]
    errors = 0
    for _ in range(400):
        image = bytearray(BASIC)
        for _ in range(rng.randint(1, 6)):
            lo, hi = rng.choice(regions)
            image[rng.randrange(lo, hi)] = rng.randrange(256)
        try:
            modinfo_from_image(bytes(image), "fuzz.ko")
        except ModuleFileError as e:
            assert e.path == "fuzz.ko"
            errors += 1
    assert 50 < errors < 400   # the damage is both caught and sometimes harmless


# ---------------------------------------------------------------------------
# The real Debian module tree, against the real modinfo

NAMED = ["e1000", "snd-hda-intel", "psmouse", "kvm-amd", "button", "speakup", "lrw",
         "fore_200e", "adiantum", "9pnet_virtio", "overlay", "btrfs"]


@pytest.fixture(scope="module")
def real_moddir() -> Path:
    try:
        moddir = fixtures.real_moddir()
    except RuntimeError as exc:
        pytest.fail(f"{exc} (these tests are never skipped)")
    if shutil.which("modinfo") is None:
        pytest.fail("modinfo (kmod) is missing: apt-get install kmod")
    return moddir


def _dep_paths(moddir: Path) -> dict[str, Path]:
    out = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        rel = line.split(":", 1)[0]
        out[Path(rel).name.split(".ko")[0].replace("-", "_")] = moddir / rel
    return out


@pytest.fixture(scope="module")
def sample(real_moddir: Path) -> list[Path]:
    """A few dozen modules: named ones with interesting fields, plus an even spread."""
    paths = _dep_paths(real_moddir)
    chosen = [paths[n.replace("-", "_")] for n in NAMED]
    everything = sorted(paths.values())
    chosen += everything[:: max(1, len(everything) // 30)]
    return list(dict.fromkeys(chosen))


def modinfo_pairs(*args: str) -> list[tuple[str, str]]:
    """The real modinfo's output as (key, value); continuation lines (signature) joined."""
    out = subprocess.run(["modinfo", *args], capture_output=True, text=True, check=True).stdout
    pairs: list[tuple[str, str]] = []
    for line in out.splitlines():
        if line.startswith("\t\t"):
            k, v = pairs[-1]
            pairs[-1] = (k, v + "\n" + line)
            continue
        key, _, rest = line.partition(":")
        # "%s:%-*s%s" with width 15 - len(key): strip exactly the padding.
        pairs.append((key, rest[abs(15 - len(key)):]))
    return pairs


def _param_line(p: Param) -> str:
    if p.description is None:
        return f"{p.name}:{p.type}"
    return f"{p.name}:{p.description} ({p.type})" if p.type else f"{p.name}:{p.description}"


def assert_same_as_modinfo(path: Path, reference: list[tuple[str, str]],
                           expect_filename: str | None = None) -> None:
    info = read_modinfo(path)
    ref: dict[str, list[str]] = {}
    for k, v in reference:
        ref.setdefault(k, []).append(v)
    assert [expect_filename or str(path)] == ref["filename"]
    assert [info.name] == ref["name"]
    assert info.aliases == ref.get("alias", [])
    assert info.depends == [d for v in ref.get("depends", []) for d in v.split(",") if d]
    assert info.softdep == ref.get("softdep", [])
    assert info.firmware == ref.get("firmware", [])
    assert info.author == ref.get("author", [])
    assert [info.vermagic] == ref["vermagic"]      # trailing space included
    assert info.license == ref["license"][0]
    assert info.description == ref.get("description", [None])[0]
    assert info.intree == (ref.get("intree") == ["Y"])
    assert info.retpoline == (ref.get("retpoline") == ["Y"])
    assert [info.sig_id] == ref["sig_id"] == ["PKCS#7"]
    assert [info.signer] == ref["signer"]
    assert [info.sig_key] == ref["sig_key"]
    assert [info.sig_hashalgo] == ref["sig_hashalgo"]
    assert info.signature is not None
    assert [info.signature.signature_hex] == ref["signature"]
    # modinfo prints parameters last-first; everything else in section order.
    assert [_param_line(p) for p in reversed(info.parm)] == ref.get("parm", [])
    ours = [(k, v) for k, v in info.info_list() if k not in ("parm", "parmtype")]
    theirs = [(k, v) for k, v in reference if k not in ("filename", "parm")]
    assert ours == theirs


@pytest.mark.realtree
def test_read_modinfo_matches_modinfo(sample: list[Path]) -> None:
    assert len(sample) >= 30
    signers = set()
    for path in sample:
        assert_same_as_modinfo(path, modinfo_pairs(str(path)))
        signers.add(read_modinfo(path).signer)
    # Debian signs every module with one build key.
    assert len(signers) == 1 and "" not in signers


@pytest.mark.realtree
def test_struct_module_name_offset_on_real_modules(sample: list[Path]) -> None:
    # The fallback for modules without "name=" reads struct module; check its offset
    # against the name modinfo reports for real x86-64 modules.
    from kmodd.modfile import elf
    for path in sample[:15]:
        elfclass, sections = elf._find_sections(path.read_bytes(), path,
                                                (".gnu.linkonce.this_module",))
        name = elf._this_module_name(elfclass, sections[".gnu.linkonce.this_module"])
        assert [name] == [v for k, v in modinfo_pairs(str(path)) if k == "name"]


@pytest.mark.realtree
def test_vermagic_matches_modinfo(sample: list[Path]) -> None:
    for path in sample[:10]:
        out = subprocess.run(["modinfo", "-F", "vermagic", str(path)], capture_output=True,
                             text=True, check=True).stdout
        assert vermagic(path) == out[:-1]


@pytest.mark.realtree
@pytest.mark.parametrize("tool,suffix", [("xz", ".xz"), ("zstd", ".zst"), ("gzip", ".gz")])
def test_recompressed_modules(real_moddir: Path, tmp_path: Path, tool: str,
                              suffix: str) -> None:
    exe = shutil.which(tool)
    assert exe is not None, f"{tool} is required by the tests"
    paths = _dep_paths(real_moddir)
    for mod in ("e1000", "snd_hda_intel", "psmouse", "lrw"):
        plain = tmp_path / paths[mod].name
        shutil.copyfile(paths[mod], plain)
        args = {"xz": ["--check=crc32", "-k", "-f"], "zstd": ["-q", "-k", "-f"],
                "gzip": ["-k", "-f", "-n"]}[tool]
        subprocess.run([exe, *args, str(plain)], check=True)
        packed = Path(str(plain) + suffix)
        original, copy = read_modinfo(plain), read_modinfo(packed)
        assert copy.filename == str(packed)
        copy.filename = original.filename
        assert copy == original
        if tool == "gzip":
            # This kmod is built without zlib: its modinfo cannot read .ko.gz, so the
            # reference is the uncompressed module's output.
            assert_same_as_modinfo(packed, modinfo_pairs(str(plain)), expect_filename=str(plain))
        else:
            assert_same_as_modinfo(packed, modinfo_pairs(str(packed)))
        assert vermagic(packed) == original.vermagic


@pytest.mark.realtree
def test_real_module_damaged(real_moddir: Path, tmp_path: Path) -> None:
    data = _dep_paths(real_moddir)["e1000"].read_bytes()
    cut = tmp_path / "half.ko"
    cut.write_bytes(data[: len(data) // 2])
    _expect_module_error(cut, "truncated")
    # Cutting into the signature leaves a valid, unsigned-looking module, as for modinfo.
    nosig = tmp_path / "nosig.ko"
    nosig.write_bytes(data[:-5])
    info = read_modinfo(nosig)
    assert info.signature is None and info.name == "e1000"
    assert not any(k == "sig_id" for k, _ in modinfo_pairs(str(nosig)))


# ---------------------------------------------------------------------------
# kmodctl info against modinfo, output compared line by line


def _kmodctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = kmodctl.main(["info", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _modinfo_text(*args: str) -> str:
    return subprocess.run(["modinfo", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.realtree
@pytest.mark.parametrize("module", [
    "e1000", "snd-hda-intel", "psmouse", "kvm_amd", "speakup", "button", "lrw", "unix", "ext4",
    # Looked up like modprobe does: a modalias, a builtin alias, a module alias.
    "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00", "net-pf-1", "fs-ext4"])
def test_kmodctl_info_by_name(real_moddir: Path, capsys: pytest.CaptureFixture[str],
                              module: str) -> None:
    version = real_moddir.name
    rc, out, err = _kmodctl(capsys, "-S", version, module)
    assert (rc, err) == (0, "")
    assert out.splitlines() == _modinfo_text("-k", version, module).splitlines()


@pytest.mark.realtree
def test_kmodctl_info_paths_and_fields(real_moddir: Path, sample: list[Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    version = real_moddir.name
    for path in sample[:8]:
        rc, out, _ = _kmodctl(capsys, str(path))
        assert rc == 0
        assert out == _modinfo_text(str(path))
    for field in ("alias", "parm", "signer", "sig_key", "depends", "filename", "vermagic",
                  "signature", "nonexistent"):
        rc, out, _ = _kmodctl(capsys, "-S", version, "-F", field, "psmouse")
        assert rc == 0
        assert out == _modinfo_text("-k", version, "-F", field, "psmouse"), field
    rc, out, _ = _kmodctl(capsys, "-S", version, "-F", "name", "unix")
    assert out == _modinfo_text("-k", version, "-F", "name", "unix")


@pytest.mark.realtree
def test_kmodctl_info_relative_paths(real_moddir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copyfile(_dep_paths(real_moddir)["e1000"], tmp_path / "e1000.ko")
    monkeypatch.chdir(tmp_path)
    for arg in ("e1000.ko", "./e1000.ko", f"../{tmp_path.name}/e1000.ko"):
        rc, out, _ = _kmodctl(capsys, arg)
        assert rc == 0
        # modinfo joins cwd and the argument without normalising: "/srv/m/./e1000.ko".
        assert out == _modinfo_text(arg), arg


@pytest.mark.realtree
def test_kmodctl_info_json(real_moddir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _kmodctl(capsys, "-S", real_moddir.name, "--json", "e1000", "unix")
    assert rc == 0
    e1000, unix = json.loads(out)
    ref = dict(modinfo_pairs("-k", real_moddir.name, "e1000"))
    assert e1000["name"] == "e1000" and e1000["filename"] == ref["filename"]
    assert e1000["signature"]["sig_key"] == ref["sig_key"]
    assert e1000["signature"]["signer"] == ref["signer"]
    assert {"name": "debug", "type": "int", "description": "Debug level (0=none,...,16=all)"} \
        in e1000["parm"]
    assert unix["builtin"] is True and ["alias", "net-pf-1"] in unix["fields"]


def test_kmodctl_info_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.ko"
    text.write_text("not a module\n")
    rc, out, err = _kmodctl(capsys, str(text))
    assert rc == 1 and out == ""
    assert str(text) in err and "not an ELF file" in err and "Traceback" not in err
    good = tmp_path / "good.ko"
    good.write_bytes(BASIC)
    # One bad argument fails the run but the others are still shown.
    rc, out, err = _kmodctl(capsys, str(good), str(tmp_path / "missing.ko"))
    assert rc == 1 and out.startswith(f"filename:       {good}\n")
    assert "No such file" in err
    rc, out, err = _kmodctl(capsys, "-d", str(tmp_path), "-S", "0.0", "no_such_module")
    assert rc == 1 and "no_such_module not found" in err


def test_kmodctl_info_config_alias_and_corrupt_index(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    moddir = tmp_path / "lib/modules/1.0"
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "kernel/fake-mod.ko").write_bytes(BASIC)
    (moddir / "modules.dep").write_text("kernel/fake-mod.ko:\n")
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "a.conf").write_text("alias my-alias fake_mod\n")
    rc, out, err = _kmodctl(capsys, "-d", str(tmp_path), "-S", "1.0", "-C", str(conf),
                            "-F", "name", "my-alias")
    assert (rc, out, err) == (0, "fake_mod\n", "")
    (moddir / "modules.dep.bin").write_bytes(b"\xb0\x07\xf4\x57garbage")
    rc, out, err = _kmodctl(capsys, "-d", str(tmp_path), "-S", "1.0", "fake_mod")
    assert rc == 1 and "modules.dep.bin" in err and "Traceback" not in err


def test_kmodctl_info_process_exit_status(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ko.zst"
    bad.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    proc = subprocess.run([sys.executable, "-m", "kmodd.cli.kmodctl", "info", str(bad)],
                          capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert "zstd" in proc.stderr and "Traceback" not in proc.stderr
