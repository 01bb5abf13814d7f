"""Enough of the Kafka protocol (and SCRAM-SHA-512) to ask a listener whether it serves."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import ssl
import struct

from .layout import HOST, SCRAM_MECHANISM, USERNAME, Layout, Node

# Just enough of it to ask each listener for metadata: ApiVersions v0, Metadata v4,
# SaslHandshake v1 and SaslAuthenticate v1 (request header v1, response header v0),
# with SCRAM-SHA-512 (RFC 5802) for the SASL_SSL listener.

API_METADATA, API_SASL_HANDSHAKE, API_API_VERSIONS, API_SASL_AUTHENTICATE = 3, 17, 18, 36
METADATA_VERSION = 4
PROBE_TIMEOUT = 5.0


class ProtocolError(Exception):
    """The listener answered, but not as a ready broker would."""


class SaslAuthenticationFailed(ProtocolError):
    """The broker rejected the SASL login (SaslAuthenticate error code and message)."""

    def __init__(self, error_code: int, message: str | None) -> None:
        super().__init__(f"SASL authentication failed (error {error_code}): {message}")
        self.error_code, self.message = error_code, message


def _string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    data = value.encode()
    return struct.pack(">h", len(data)) + data


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        value = self.data[self.offset : self.offset + length].decode()
        self.offset += length
        return value

    def bytes_(self) -> bytes:
        length = self.take(">i")
        value = self.data[self.offset : self.offset + max(length, 0)]
        self.offset += max(length, 0)
        return value


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.correlation_id = sock, 0

    def request(self, api_key: int, version: int, body: bytes) -> Reader:
        self.correlation_id += 1
        header = struct.pack(">hhi", api_key, version, self.correlation_id)
        message = header + _string("loader-broker-probe") + body
        self.sock.sendall(struct.pack(">i", len(message)) + message)
        (size,) = struct.unpack(">i", self._read(4))
        reader = Reader(self._read(size))
        if reader.take(">i") != self.correlation_id:
            raise ProtocolError("response for another request")
        return reader

    def _read(self, size: int) -> bytes:
        chunks, remaining = [], size
        while remaining:
            chunk = self.sock.recv(remaining)
            if not chunk:
                raise ProtocolError("connection closed by the broker")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def metadata(self) -> tuple[str | None, list[tuple[int, str, int]]]:
        """(cluster id, [(node id, host, port)]) of a Metadata v4 request for no topic."""
        body = struct.pack(">i", 0) + struct.pack(">?", False)  # topics: [], no auto-create
        reader = self.request(API_METADATA, METADATA_VERSION, body)
        reader.take(">i")  # throttle_time_ms
        brokers = []
        for _ in range(reader.take(">i")):
            node_id = reader.take(">i")
            host = reader.string() or ""
            port = reader.take(">i")
            reader.string()  # rack
            brokers.append((node_id, host, port))
        cluster_id = reader.string()
        if not brokers:
            raise ProtocolError("metadata lists no broker yet")
        return cluster_id, brokers

    def scram_login(self, username: str, password: str) -> None:
        reader = self.request(API_SASL_HANDSHAKE, 1, _string(SCRAM_MECHANISM))
        error_code = reader.take(">h")
        mechanisms = [reader.string() for _ in range(reader.take(">i"))]
        if error_code != 0:
            raise ProtocolError(f"SaslHandshake error {error_code}; broker offers {mechanisms}")
        scram = ScramClient(username, password)
        server_first = self._authenticate(scram.first_message())
        server_final = self._authenticate(scram.final_message(server_first))
        scram.verify_server(server_final)

    def _authenticate(self, token: bytes) -> bytes:
        reader = self.request(API_SASL_AUTHENTICATE, 1, struct.pack(">i", len(token)) + token)
        error_code = reader.take(">h")
        error_message = reader.string()
        answer = reader.bytes_()
        if error_code != 0:
            raise SaslAuthenticationFailed(error_code, error_message)
        return answer


class ScramClient:
    """The client side of SCRAM-SHA-512 (RFC 5802), without channel binding."""

    def __init__(self, username: str, password: str) -> None:
        name = username.replace("=", "=3D").replace(",", "=2C")
        self.password = password.encode()
        self.nonce = secrets.token_urlsafe(18)
        self.first_bare = f"n={name},r={self.nonce}"
        self.auth_message = b""
        self.salted = b""

    def first_message(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def final_message(self, server_first: bytes) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        nonce, salt, iterations = fields["r"], base64.b64decode(fields["s"]), int(fields["i"])
        if not nonce.startswith(self.nonce):
            raise ProtocolError("SCRAM server nonce does not extend ours")
        self.salted = hashlib.pbkdf2_hmac("sha512", self.password, salt, iterations)
        client_key = hmac.digest(self.salted, b"Client Key", "sha512")
        stored_key = hashlib.sha512(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        self.auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, self.auth_message, "sha512")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server(self, server_final: bytes) -> None:
        server_key = hmac.digest(self.salted, b"Server Key", "sha512")
        expected = hmac.digest(server_key, self.auth_message, "sha512")
        fields = dict(item.split("=", 1) for item in server_final.decode().split(","))
        if "v" not in fields or not hmac.compare_digest(base64.b64decode(fields["v"]), expected):
            raise ProtocolError(f"SCRAM server signature is wrong: {server_final!r}")


Metadata = tuple[str | None, list[tuple[int, str, int]]]


def probe_plaintext(host: str, port: int) -> Metadata:
    """(cluster id, brokers) from a PLAINTEXT listener."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
        return Connection(sock).metadata()


def probe_sasl_ssl(host: str, port: int, cafile: str, username: str, password: str) -> Metadata:
    """(cluster id, brokers) from a SASL_SSL listener, logged in with SCRAM-SHA-512.

    Raises ssl.SSLCertVerificationError when cafile did not sign the broker's
    certificate and SaslAuthenticationFailed when the broker rejects the login.
    """
    context = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        connection = Connection(sock)
        connection.scram_login(username, password)
        return connection.metadata()


def probe_local(layout: Layout, node: Node, password: str) -> None:
    """Both listeners of `node` answer, and its metadata lists every node as a live broker."""
    for _cluster_id, brokers in (
        probe_plaintext(HOST, node.plaintext_port),
        probe_sasl_ssl(HOST, node.sasl_ssl_port, str(layout.ca_pem), USERNAME, password),
    ):
        if len(brokers) < len(layout.nodes):
            raise ProtocolError(f"metadata lists {len(brokers)} of {len(layout.nodes)} brokers")
