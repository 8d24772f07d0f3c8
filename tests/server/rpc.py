"""Helpers for the server tests: every RPC of every service (discovered from the generated
descriptors, so services added later are covered), raw calls over a generic channel, certificates."""

from __future__ import annotations

import datetime
import importlib
import ipaddress
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import grpc

import retrieval.v1


@dataclass(frozen=True)
class Rpc:
    service: str            # "retrieval.v1.Points"
    name: str               # "Upsert"
    input: type             # request message class
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    def __str__(self) -> str:
        return f"{self.service}/{self.name}"


def all_rpcs() -> list[Rpc]:
    """Every method of every service in retrieval/v1 (generated code)."""
    from google.protobuf import message_factory

    out = []
    for mod in pkgutil.iter_modules(retrieval.v1.__path__):
        if not mod.name.endswith("_pb2"):
            continue
        pb2 = importlib.import_module(f"retrieval.v1.{mod.name}")
        for sd in pb2.DESCRIPTOR.services_by_name.values():
            for md in sd.methods:
                cls = message_factory.GetMessageClass(md.input_type)
                out.append(Rpc(sd.full_name, md.name, cls, md.client_streaming, md.server_streaming))
    return sorted(out, key=str)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailing: dict
    response_bytes: int = 0   # total size of the response messages received


def raw_call(channel: grpc.Channel, rpc: Rpc, payloads: list[bytes], metadata=(), timeout: float = 10.0) -> Outcome:
    """Send raw request bytes (any bytes, valid protobuf or not) and return the final status. Server
    streams are read to their end (or error)."""
    ident = lambda b: b  # noqa: E731
    md = tuple(metadata)
    got = 0
    try:
        if not rpc.client_streaming and not rpc.server_streaming:
            resp, call = channel.unary_unary(rpc.path, request_serializer=ident, response_deserializer=ident).with_call(
                payloads[0], timeout=timeout, metadata=md)
            got = len(resp)
        elif rpc.client_streaming and not rpc.server_streaming:
            resp, call = channel.stream_unary(rpc.path, request_serializer=ident, response_deserializer=ident).with_call(
                iter(payloads), timeout=timeout, metadata=md)
            got = len(resp)
        else:
            if rpc.client_streaming:
                call = channel.stream_stream(rpc.path, request_serializer=ident, response_deserializer=ident)(
                    iter(payloads), timeout=timeout, metadata=md)
            else:
                call = channel.unary_stream(rpc.path, request_serializer=ident, response_deserializer=ident)(
                    payloads[0], timeout=timeout, metadata=md)
            for resp in call:
                got += len(resp)
        return Outcome(call.code(), call.details() or "", dict(call.trailing_metadata() or ()), got)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", dict(e.trailing_metadata() or ()), got)


# ------------------------------------------------------------------------------------------------
# Certificates (the `cryptography` package)
# ------------------------------------------------------------------------------------------------
def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject_cn: str, key, issuer_cn: str, issuer_key, ca: bool, san: list | None = None, client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    from cryptography.hazmat.primitives import serialization

    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost / 127.0.0.1, a client certificate signed by the CA,
    and a client certificate signed by an unrelated CA. Returns name -> PEM path."""
    from cryptography import x509

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_key, srv_key, cli_key, bad_key = _key(), _key(), _key(), _key(), _key()
    files = {
        "ca": _cert("retrieval test CA", ca_key, "retrieval test CA", ca_key, ca=True),
        "rogue_ca": _cert("rogue CA", rogue_key, "rogue CA", rogue_key, ca=True),
        "server_cert": _cert("localhost", srv_key, "retrieval test CA", ca_key, ca=False,
                             san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        "server_key": _pem_key(srv_key),
        "client_cert": _cert("client-1", cli_key, "retrieval test CA", ca_key, ca=False, client=True),
        "client_key": _pem_key(cli_key),
        "rogue_client_cert": _cert("intruder", bad_key, "rogue CA", rogue_key, ca=False, client=True),
        "rogue_client_key": _pem_key(bad_key),
    }
    out = {}
    for name, data in files.items():
        p = folder / f"{name}.pem"
        p.write_bytes(data)
        p.chmod(0o600)
        out[name] = p
    return out


def hosted_services(channel: grpc.Channel, metadata=()) -> set[str]:
    """Full names of the services a running server hosts (server reflection)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=30, metadata=tuple(metadata))))
    return {s.name for s in reply.list_services_response.service}


def hosted_rpcs(address: str, metadata=()) -> list[Rpc]:
    """:func:`all_rpcs` of the services the server at ``address`` hosts."""
    with grpc.insecure_channel(address) as ch:
        names = hosted_services(ch, metadata)
    return [r for r in all_rpcs() if r.service in names]
